"""Readers on generated trees: counts, reference order and gallery draws, clear layout errors."""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from dist_reid.data import DatasetLayoutError, open_dataset
from dist_reid.data.records import summarize


def _copy(tree: Path, tmp_path: Path) -> Path:
    target = tmp_path / tree.name
    shutil.copytree(tree, target)
    return target


def _reference_sysu_gallery(
    root: Path, test_ids: list[int], cams: list[str], trial: int
) -> list[str]:
    """The community reference's draw, literally: global ``random.seed(trial)`` then one
    ``random.choice`` over each sorted folder listing (state restored afterwards)."""
    state = random.getstate()
    try:
        random.seed(trial)
        picks = []
        for pid in sorted(f"{i:04d}" for i in test_ids):
            for cam in cams:
                folder = os.path.join(root, cam, pid)
                if os.path.isdir(folder):
                    files = sorted(folder + "/" + name for name in os.listdir(folder))
                    picks.append(random.choice(files))
        return picks
    finally:
        random.setstate(state)


# --- SYSU-MM01 -------------------------------------------------------------------------------


def test_sysu_counts_match_what_was_generated(synthetic_trees):
    root, summary = synthetic_trees["sysu"]
    ds = open_dataset("sysu", root)
    stats = summarize(ds.train)
    assert stats["visible"]["images"] == summary.images["train/visible"]
    assert stats["infrared"]["images"] == summary.images["train/infrared"]
    assert ds.num_train_ids == len(summary.splits["train"]) + len(summary.splits["val"])
    assert set(stats["visible"]["cams"]) <= {1, 2, 4, 5}
    assert set(stats["infrared"]["cams"]) <= {3, 6}
    query, _ = ds.test_split(trial=0, mode="all")
    assert len(query) == summary.images["test/infrared"]
    assert {r.pid for r in query} <= set(summary.splits["test"])
    labels = ds.train_labels()
    assert sorted(labels.values()) == list(range(ds.num_train_ids))
    assert [pid for pid, _ in sorted(labels.items(), key=lambda kv: kv[1])] == sorted(labels)


def test_sysu_without_val_trains_on_train_ids_only(synthetic_trees):
    root, summary = synthetic_trees["sysu"]
    ds = open_dataset("sysu", root, include_val=False)
    assert {r.pid for r in ds.train} == set(summary.splits["train"])


def test_sysu_query_order_is_the_references(synthetic_trees):
    root, summary = synthetic_trees["sysu"]
    query, _ = open_dataset("sysu", root).test_split(trial=0)
    expected = []
    for pid in sorted(f"{i:04d}" for i in summary.splits["test"]):
        for cam in ("cam3", "cam6"):
            folder = root / cam / pid
            if folder.is_dir():
                expected += sorted(str(folder / n) for n in os.listdir(folder))
    assert [r.path for r in query] == expected
    assert all(r.modality == "infrared" and r.cam in (3, 6) for r in query)
    assert all(Path(r.path).parent.name == f"{r.pid:04d}" for r in query)


@pytest.mark.parametrize(
    "mode,cams", [("all", ["cam1", "cam2", "cam4", "cam5"]), ("indoor", ["cam1", "cam2"])]
)
@pytest.mark.parametrize("trial", [0, 3, 9])
def test_sysu_gallery_equals_reference_draw(synthetic_trees, mode, cams, trial):
    root, summary = synthetic_trees["sysu"]
    _, gallery = open_dataset("sysu", root).test_split(trial=trial, mode=mode)
    assert [r.path for r in gallery] == _reference_sysu_gallery(
        root, summary.splits["test"], cams, trial
    )
    per_folder = Counter((r.pid, r.cam) for r in gallery)
    assert set(per_folder.values()) == {1}  # single-shot: one image per (id, camera)
    assert {r.cam for r in gallery} <= {int(c[3:]) for c in cams}


def test_sysu_trials_draw_different_galleries_and_repeat_exactly(synthetic_trees):
    root, _ = synthetic_trees["sysu"]
    ds = open_dataset("sysu", root)
    draws = [tuple(r.path for r in ds.test_split(trial=t)[1]) for t in range(10)]
    assert len(set(draws)) > 1
    assert draws[4] == tuple(r.path for r in open_dataset("sysu", root).test_split(trial=4)[1])


def test_sysu_multi_shot_draws_up_to_ten_distinct_images_per_folder(synthetic_trees):
    root, _ = synthetic_trees["sysu"]
    ds = open_dataset("sysu", root)
    gallery = ds.gallery(trial=1, mode="all", multi_shot=True)
    single = ds.gallery(trial=1, mode="all")
    per_folder = Counter((r.pid, r.cam) for r in gallery)
    assert len(per_folder) == len(single)
    for (pid, cam), count in per_folder.items():
        available = len(os.listdir(root / f"cam{cam}" / f"{pid:04d}"))
        assert count == min(10, available)
    assert len({r.path for r in gallery}) == len(gallery)


def test_sysu_rejects_unknown_mode_and_trial(synthetic_trees):
    ds = open_dataset("sysu", synthetic_trees["sysu"][0])
    with pytest.raises(ValueError, match="outdoor"):
        ds.test_split(trial=0, mode="outdoor")
    with pytest.raises(ValueError, match="trial 10"):
        ds.test_split(trial=10)


def test_sysu_missing_camera_folder_names_it(synthetic_trees, tmp_path):
    root = _copy(synthetic_trees["sysu"][0], tmp_path)
    shutil.rmtree(root / "cam4")
    with pytest.raises(DatasetLayoutError, match=r"cam4.*expected layout"):
        open_dataset("sysu", root)


def test_sysu_missing_split_file_names_it(synthetic_trees, tmp_path):
    root = _copy(synthetic_trees["sysu"][0], tmp_path)
    (root / "exp" / "test_id.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"test_id\.txt"):
        open_dataset("sysu", root)


def test_sysu_stray_file_in_identity_folder_is_an_error_not_a_gallery_entry(
    synthetic_trees, tmp_path
):
    root = _copy(synthetic_trees["sysu"][0], tmp_path)
    folder = next((root / "cam1").iterdir())
    (folder / "Thumbs.db").write_bytes(b"\0")
    with pytest.raises(DatasetLayoutError, match=r"Thumbs\.db"):
        ds = open_dataset("sysu", root)
        for trial in ds.trials:  # a test-id folder is only listed when a split is built
            ds.test_split(trial=trial)


def test_sysu_bad_id_file_names_the_token(synthetic_trees, tmp_path):
    root = _copy(synthetic_trees["sysu"][0], tmp_path)
    (root / "exp" / "val_id.txt").write_text("1,2,x3\n")
    with pytest.raises(DatasetLayoutError, match=r"val_id\.txt.*'x3'"):
        open_dataset("sysu", root)


def test_missing_root_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        open_dataset("llcm", tmp_path / "nowhere")


def test_unknown_dataset_name_suggests_the_close_one(tmp_path):
    with pytest.raises(KeyError, match="sysu"):
        open_dataset("sysuu", tmp_path)


# --- RegDB -----------------------------------------------------------------------------------


def test_regdb_counts_and_training_labels(synthetic_trees):
    root, summary = synthetic_trees["regdb"]
    for trial in (1, 7):
        ds = open_dataset("regdb", root, trial=trial)
        n_train = len(summary.splits[f"train_{trial}"])
        assert sorted({r.pid for r in ds.train}) == list(range(n_train))  # class indices 0..C-1
        stats = summarize(ds.train)
        assert stats["visible"]["images"] == stats["infrared"]["images"] == n_train * 4
        assert stats["visible"]["cams"] == {1: n_train * 4} and stats["infrared"]["cams"] == {
            2: n_train * 4
        }


def test_regdb_directions_swap_query_and_gallery(synthetic_trees):
    root, summary = synthetic_trees["regdb"]
    ds = open_dataset("regdb", root, trial=2)
    v_query, t_gallery = ds.test_split(trial=2, direction="v2t")
    t_query, v_gallery = ds.test_split(trial=2, direction="t2v")
    assert v_query == v_gallery and t_gallery == t_query
    assert all(r.modality == "visible" for r in v_query) and all(
        r.modality == "infrared" for r in t_query
    )
    lines = (root / "idx" / "test_visible_2.txt").read_text().split()
    assert [r.path for r in v_query] == [str(root / p) for p in lines[0::2]]  # file order kept
    assert {r.pid for r in v_query} == set(summary.splits["test_2"])


def test_regdb_missing_image_names_list_file_and_line(synthetic_trees, tmp_path):
    root = _copy(synthetic_trees["regdb"][0], tmp_path)
    first = (root / "idx" / "train_thermal_1.txt").read_text().splitlines()[2].split(" ")[0]
    (root / first).unlink()
    with pytest.raises(
        DatasetLayoutError, match=r"train_thermal_1\.txt:3: image .* does not exist"
    ):
        open_dataset("regdb", root, trial=1)


def test_regdb_malformed_line_is_named(synthetic_trees, tmp_path):
    root = _copy(synthetic_trees["regdb"][0], tmp_path)
    path = root / "idx" / "test_visible_3.txt"
    path.write_text(path.read_text().replace(" ", "\t", 1))
    ds = open_dataset("regdb", root, trial=1)
    with pytest.raises(DatasetLayoutError, match=r"test_visible_3\.txt:1"):
        ds.test_split(trial=3)


# --- LLCM ------------------------------------------------------------------------------------


def test_llcm_counts_cameras_and_directions(synthetic_trees):
    root, summary = synthetic_trees["llcm"]
    ds = open_dataset("llcm", root)
    stats = summarize(ds.train)
    assert stats["visible"]["images"] == summary.images["train/visible"]
    assert stats["infrared"]["images"] == summary.images["train/infrared"]
    assert {r.pid for r in ds.train} == set(summary.splits["train"])
    assert 3 not in stats["infrared"]["cams"]
    nir_query, vis_gallery = ds.test_split(trial=0, direction="i2v")
    vis_query, nir_gallery = ds.test_split(trial=0, direction="v2i")
    assert len(nir_query) == summary.images["test/infrared"]
    assert len(vis_query) == summary.images["test/visible"]
    assert {r.modality for r in nir_query} == {"infrared"} == {r.modality for r in nir_gallery}
    assert {r.modality for r in vis_query} == {"visible"} == {r.modality for r in vis_gallery}
    assert set(Counter((r.pid, r.cam) for r in vis_gallery).values()) == {1}
    # DEEN's transposed VIS->IR: the sampled NIR images become the queries against all VIS.
    t_query, t_gallery = ds.test_split(trial=0, direction="v2i", transposed_v2i=True)
    assert t_query == nir_gallery and t_gallery == vis_query


def test_llcm_gallery_equals_reference_draw(synthetic_trees):
    root, summary = synthetic_trees["llcm"]
    ds = open_dataset("llcm", root)
    cams = [f"test_vis/cam{c}" for c in range(1, 10)]
    for trial in (0, 5):
        expected = _reference_sysu_gallery(root, summary.splits["test"], cams, trial)
        assert [r.path for r in ds.test_split(trial=trial, direction="i2v")[1]] == expected


def test_llcm_badly_named_training_image_is_named(synthetic_trees, tmp_path):
    root = _copy(synthetic_trees["llcm"][0], tmp_path)
    lines = (root / "idx" / "train_vis.txt").read_text().splitlines()
    rel, label = lines[0].split(" ")
    renamed = str(Path(rel).with_name("image.jpg"))
    (root / rel).rename(root / renamed)
    (root / "idx" / "train_vis.txt").write_text(
        "\n".join([f"{renamed} {label}", *lines[1:]]) + "\n"
    )
    with pytest.raises(DatasetLayoutError, match=r"image\.jpg is not named"):
        open_dataset("llcm", root)


def test_llcm_missing_nir_camera_folder_is_named(synthetic_trees, tmp_path):
    root = _copy(synthetic_trees["llcm"][0], tmp_path)
    shutil.rmtree(root / "test_nir" / "cam7")
    with pytest.raises(DatasetLayoutError, match=r"test_nir/cam7"):
        open_dataset("llcm", root)
