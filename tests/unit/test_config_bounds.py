"""Every count and interval key is bounded in the schema (one ConfigError naming the key), and
YAML tags in command-line overrides are refused as one ConfigError before anything runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dist_reid.config import ConfigError, load_config
from dist_reid.tune import load_sweep

# (override, the key the error must name): the smallest value each key refuses
OUT_OF_RANGE = [
    ("train.log_every=0", "train.log_every"),
    ("train.log_every=-3", "train.log_every"),
    ("train.eval_every=-1", "train.eval_every"),
    ("train.max_steps=-1", "train.max_steps"),
    ("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.epochs=-1", "train.epochs"),
    ("train.ids_per_batch=0", "train.ids_per_batch"),
    ("train.instances_per_modality=0", "train.instances_per_modality"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.height=0", "data.height"),
    ("data.width=-8", "data.width"),
    ("data.augment.pad=-1", "data.augment.pad"),
    ("data.synthetic.num_ids=3", "data.synthetic.num_ids"),
    ("data.synthetic.images_per_camera=0", "data.synthetic.images_per_camera"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
    ("optim.milestones=[-5,20]", "optim.milestones"),
    ("optim.cycle_epochs=0", "optim.cycle_epochs"),
    ("optim.cycle_limit=-1", "optim.cycle_limit"),
    ("eval.max_rank=0", "eval.max_rank"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.chance_draws=-1", "eval.chance_draws"),
    ("eval.rerank_k1=0", "eval.rerank_k1"),
    ("eval.rerank_k2=0", "eval.rerank_k2"),
    ("eval.query_expansion=-1", "eval.query_expansion"),
    ("eval.trials=[0,-1]", "eval.trials"),
]


@pytest.mark.parametrize(("override", "key"), OUT_OF_RANGE)
def test_count_and_interval_keys_out_of_range_name_the_key(override, key):
    with pytest.raises(
        ConfigError, match=rf"^overrides?: .*{re.escape(key)}: |^{re.escape(key)}: "
    ):
        load_config(None, ["data.root=/x", override])


def test_the_smallest_valid_counts_load():
    cfg = load_config(
        None,
        [
            "data.root=/x",
            "train.log_every=1",
            "train.eval_every=0",
            "train.max_steps=0",
            "train.checkpoint_every_steps=0",
            "eval.query_expansion=0",
            "eval.rerank_k2=1",
            "optim.milestones=[0]",
        ],
    )
    assert cfg.train.log_every == 1 and cfg.optim.milestones == (0,)


SWEEP = """\
base_config: {base}
search_space:
  train.lr: {{grid: [0.1, 0.01]}}
"""


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("num_samples=0", "num_samples"),
        ("max_failures=-2", "max_failures"),
        ("scheduler.max_t=-1", "scheduler.max_t"),
        ("scheduler.reduction_factor=1", "scheduler.reduction_factor"),
        ("resources.cpu=0", "resources.cpu"),
        ("resources.gpu=-1", "resources.gpu"),
    ],
)
def test_sweep_counts_out_of_range_name_the_key(tmp_path, override, key):
    base = Path(__file__).resolve().parents[2] / "configs/sysu/agw.yaml"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP.format(base=base))
    load_sweep(sweep)  # the file itself is valid
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: "):
        load_sweep(sweep, (override,))


@pytest.mark.parametrize(
    "override",
    [
        'run.name=!!python/object/apply:os.system ["touch {marker}"]',
        "run.name=!!python/name:os.system",
        "train.lr=!!python/object/new:float [0.5]",
        "data.root=!!binary aGVsbG8=",
    ],
)
def test_a_yaml_tag_in_an_override_is_one_config_error_and_nothing_runs(tmp_path, override):
    marker = tmp_path / "ran"
    override = override.format(marker=marker)
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, ["data.root=/x", override])
    message = str(excinfo.value)
    assert "\n" not in message and override.partition("=")[0] in message and "tag" in message
    assert not marker.exists()
