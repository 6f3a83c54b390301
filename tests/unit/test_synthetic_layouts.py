"""The generator writes the real layouts, deterministically, and never clobbers data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from dist_reid.data.synthetic.layouts import MANIFEST, SyntheticError, generate, read_manifest


def _digest(root: Path) -> dict[str, str]:
    """Hashes of the dataset's files; the manifest (it names the seed) is left out, so that
    "other seed, other bytes" is about the images and split files."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


@pytest.mark.parametrize("layout", ["sysu", "regdb", "llcm"])
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, layout):
    a = generate(layout, tmp_path / "a", 6, seed=3, images_per_camera=2)
    b = generate(layout, tmp_path / "b", 6, seed=3, images_per_camera=2)
    generate(layout, tmp_path / "c", 6, seed=4, images_per_camera=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert a.images == b.images and a.splits == b.splits


def test_sysu_layout_files(synthetic_trees):
    root, summary = synthetic_trees["sysu"]
    for name in ("train_id", "val_id", "test_id", "available_id"):
        text = (root / "exp" / f"{name}.txt").read_text()
        assert len(text.splitlines()) == 1 and all(t.isdigit() for t in text.strip().split(","))
    ids = [int(t) for t in (root / "exp" / "test_id.txt").read_text().strip().split(",")]
    assert ids == summary.splits["test"]
    images = sorted(root.glob("cam*/*/*"))
    assert images and all(p.parent.name.isdigit() and len(p.parent.name) == 4 for p in images)
    assert all(len(p.stem) == 4 and p.suffix == ".jpg" for p in images)
    with Image.open(next(root.glob("cam3/*/*.jpg"))) as ir:
        r, g, b = ir.convert("RGB").split()
        assert r.tobytes() == g.tobytes() == b.tobytes() or ir.mode == "L"


def test_regdb_layout_files(synthetic_trees):
    root, summary = synthetic_trees["regdb"]
    for trial in range(1, 11):
        for part in ("train", "test"):
            for modality in ("visible", "thermal"):
                lines = (root / "idx" / f"{part}_{modality}_{trial}.txt").read_text().splitlines()
                assert lines and all(len(line.split(" ")) == 2 for line in lines)
                folder = "Visible" if modality == "visible" else "Thermal"
                assert all(
                    line.startswith(f"{folder}/") and line.split(" ")[0].endswith(".bmp")
                    for line in lines
                )
        train, test = summary.splits[f"train_{trial}"], summary.splits[f"test_{trial}"]
        assert not set(train) & set(test) and len(train) + len(test) == summary.num_ids


def test_llcm_layout_files(synthetic_trees):
    root, _ = synthetic_trees["llcm"]
    assert sorted(p.name for p in (root / "test_nir").iterdir()) == sorted(
        f"cam{c}" for c in (1, 2, 4, 5, 6, 7, 8, 9)
    )
    assert sorted(p.name for p in (root / "test_vis").iterdir()) == sorted(
        f"cam{c}" for c in range(1, 10)
    )
    line = (root / "idx" / "train_nir.txt").read_text().splitlines()[0]
    rel, label = line.split(" ")
    assert rel.startswith("nir/") and rel.endswith("_nir.jpg") and label.isdigit()


def test_refuses_to_overwrite_existing_data(tmp_path):
    (tmp_path / "SYSU-MM01").mkdir()
    (tmp_path / "SYSU-MM01" / "precious.txt").write_text("keep me")
    with pytest.raises(SyntheticError, match="already exists"):
        generate("sysu", tmp_path / "SYSU-MM01", 6)
    assert (tmp_path / "SYSU-MM01" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"layout": "market"}, "layout"),
        ({"num_ids": 1}, "num_ids"),
        ({"images_per_camera": -1}, "images_per_camera"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, match):
    args = {"layout": "sysu", "root": tmp_path / "x", "num_ids": 6, **kwargs}
    with pytest.raises(SyntheticError, match=match):
        generate(**args)


def test_a_tree_generated_with_other_arguments_is_refused_not_reused(tmp_path):
    """``data.synthetic`` generates a missing tree and reuses an existing one; a tree written
    with other arguments (here 6 ids, asked 8) must stop the run with one line naming the
    manifest and each differing argument, not train silently on the old data."""
    from dist_reid.builders import ensure_synthetic
    from dist_reid.config import load_config

    root = tmp_path / "SYSU-MM01"
    generate("sysu", root, 6, seed=3, images_per_camera=1)
    assert read_manifest(root) == {
        "layout": "sysu", "num_ids": 6, "seed": 3, "images_per_camera": 1
    }  # fmt: skip
    keys = [f"data.root={root}", "data.synthetic.enabled=true", "data.synthetic.seed=3"]
    same = load_config(
        None, [*keys, "data.synthetic.num_ids=6", "data.synthetic.images_per_camera=1"]
    )
    ensure_synthetic(same)  # the same arguments: reused as it is
    other = load_config(
        None, [*keys, "data.synthetic.num_ids=8", "data.synthetic.images_per_camera=1"]
    )
    with pytest.raises(ValueError) as caught:
        ensure_synthetic(other)
    message = str(caught.value)
    assert "\n" not in message and str(root / MANIFEST) in message
    assert "num_ids=6 (asked: 8)" in message and "seed" not in message.split("generated with")[1]
    assert read_manifest(root)["num_ids"] == 6  # nothing was rewritten
