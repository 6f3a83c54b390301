"""Config loading: inheritance, overrides, one clear error per mistake, frozen result, dump."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dist_reid.config import ConfigError, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    shipped = sorted(
        p
        for p in CONFIGS.rglob("*.yaml")
        if "base" in p.parts or "datasets" in p.parts or "experiments" in p.parts
    )
    assert shipped
    for path in shipped:
        # base/ files and the accuracy benchmark's fragments (its recipe, size_<method>) name no
        # data root
        fragment = (
            "base" in path.parts or path.name == "recipe.yaml" or path.name.startswith("size_")
        )
        overrides = ["data.root=/data/x"] if fragment else []
        cfg = load_config(path, overrides)
        assert cfg.data.root


def test_base_chain_and_dotted_overrides(tmp_path):
    _write(tmp_path / "base.yaml", "train:\n  lr: 0.5\n  epochs: 3\ndata:\n  root: /a\n")
    _write(tmp_path / "mid/child.yaml", "_base_: ../base.yaml\ntrain:\n  epochs: 7\n")
    cfg = load_config(
        tmp_path / "mid/child.yaml",
        ["train.lr=3e-4", "data.root=/data/SYSU-MM01", "eval.trials=[0,2]"],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.epochs == 7
    assert cfg.data.root == "/data/SYSU-MM01" and cfg.eval.trials == (0, 2)


def test_unknown_key_names_it_and_suggests(tmp_path):
    path = _write(tmp_path / "c.yaml", "data:\n  root: /a\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.lrr: .*Did you mean: 'lr'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"overrides: data\.rot: .*'root'"):
        load_config(None, ["data.rot=/x"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs: .*'many'"):
        load_config(None, ["data.root=/x", "train.epochs=many"])


def test_missing_required_value_is_named():
    with pytest.raises(ConfigError, match=r"missing required value\(s\): data\.root"):
        load_config(None, [])


def test_value_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.dataset: must be one of"):
        load_config(None, ["data.root=/x", "data.dataset=market"])
    with pytest.raises(ConfigError, match=r"eval\.settings: 'v2t' is not a setting of 'sysu'"):
        load_config(None, ["data.root=/x", "eval.settings=[v2t]"])
    with pytest.raises(ConfigError, match=r"train\.lr: must be > 0"):
        load_config(None, ["data.root=/x", "train.lr=0"])


def test_schedule_keys_are_checked_and_presets_pick_theirs():
    with pytest.raises(ConfigError, match=r"optim\.schedule: must be step\|cosine_refine"):
        load_config(None, ["data.root=/x", "optim.schedule=cosine"])
    with pytest.raises(ConfigError, match=r"optim\.cycle_epochs: must be >= 1"):
        load_config(None, ["data.root=/x", "optim.cycle_epochs=0"])
    with pytest.raises(ConfigError, match=r"optim\.min_lr_factor: must be >= 0"):
        load_config(None, ["data.root=/x", "optim.min_lr_factor=-1"])
    assert load_config(None, ["data.root=/x"]).optim.schedule == "step"
    for dataset in ("sysu", "regdb", "llcm"):
        mip = load_config(CONFIGS / dataset / "mip.yaml", ["data.root=/x"]).optim
        # train.sh: SCHEDULER cosine-refine, COSINE_EPOCHS 30, MIN_INDEX 1e-5; default WARMUP_EPOCHS
        # 5; the factory's decay_rate 0.1, cycle_limit 10, warm-up start 0.01 * BASE_LR
        assert (mip.schedule, mip.cycle_epochs, mip.min_lr_factor, mip.warmup_epochs) == (
            "cosine_refine", 30, 1e-5, 5,
        )  # fmt: skip
        assert (mip.cycle_decay, mip.cycle_limit, mip.warmup_init_factor) == (0.1, 10, 0.01)
        agw = load_config(CONFIGS / dataset / "agw.yaml", ["data.root=/x"]).optim
        assert agw.schedule == "step"


def test_base_cycle_and_missing_base_are_clear(tmp_path):
    _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", "_base_: nothere.yaml\n")
    with pytest.raises(ConfigError, match=r"nothere\.yaml .*named in .*c\.yaml"):
        load_config(tmp_path / "c.yaml")


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        load_config(None, ["train.lr"])
    path = _write(tmp_path / "bad.yaml", "data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(path)


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "experiments/demo_sysu_untrained.yaml", ["train.lr=0.02"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    written = save_config(cfg, tmp_path / "run")
    assert written.name == "config.yaml"
    assert load_config(written) == cfg


@pytest.mark.parametrize(
    "override,match",
    [
        ("data.sampler=random", r"data\.sampler: must be modality_balanced\|identity_modality"),
        ("data.sampler_replacement=never", r"data\.sampler_replacement: must be always\|when_short"),
        ("data.sampler_remainder=keep", r"data\.sampler_remainder: must be drop\|pad"),
        ("data.mean=[0.5,0.5]", r"data\.mean: must be 3 values"),
        ("data.std=[0.5,0,0.5]", r"data\.std: must be positive"),
        ("data.augment.erasing_area=[0.5,0.2]", r"data\.augment\.erasing_area: must be \[low, high\]"),
        ("data.augment.erasing_fill=[0,0]", r"data\.augment\.erasing_fill: must be 3 values"),
        ("data.augment.grayscale=1.5", r"data\.augment\.grayscale: must be a probability"),
        ("data.augment.erasing_mode=pil", r"data\.augment\.erasing_mode: must be torchvision\|released"),
    ],
)
def test_data_keys_of_the_faithful_presets_are_checked(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.root=/x", override])


def test_presets_select_the_released_sampler_normalisation_and_augmentation():
    """Which preset follows which released sampler / statistics / transform (issue 12, sec. 2)."""
    from dist_reid.builders import augment_options

    root = ["data.root=/x"]
    for method in ("agw", "icre", "emif", "pdm"):
        for dataset in ("sysu", "regdb", "llcm"):
            cfg = load_config(CONFIGS / dataset / f"{method}.yaml", root)
            assert (cfg.data.sampler, cfg.data.sampler_replacement) == ("modality_balanced", "always")
            assert tuple(cfg.data.mean) == (0.485, 0.456, 0.406)
    for dataset in ("sysu", "regdb", "llcm"):
        mip = load_config(CONFIGS / dataset / "mip.yaml", root)
        assert mip.data.sampler == "identity_modality"
        assert mip.data.sampler_remainder == ("pad" if dataset == "regdb" else "drop")
        assert tuple(mip.data.mean) == tuple(mip.data.std) == (0.5, 0.5, 0.5)
        assert augment_options(mip).grayscale == 0.5  # released AUG 2 RandomGrayscale(0.5)
        pdm = augment_options(load_config(CONFIGS / dataset / "pdm.yaml", root))
        area = (0.2, 0.8) if dataset == "sysu" else (0.02, 0.4)  # train_pdm.py transform_<dataset>
        assert pdm.erasing_scale == area and pdm.grayscale == 0.5 and pdm.random_erasing == 0.5
        assert pdm.erasing_fill == (0.485, 0.456, 0.406) and pdm.erasing_mode == "released"
    default = load_config(None, root)  # library defaults keep today's behaviour
    assert default.data.sampler_replacement == "when_short"
    assert augment_options(default).erasing_scale == (0.02, 0.4)
    assert augment_options(default).erasing_mode == "torchvision"
