"""train.mixed_precision is decided in one place: ``auto`` follows ``accelerate launch
--mixed_precision`` (the DeepSpeed JSON under that backend), an explicit value wins with a warning
naming both, rank 0 logs the source once, and each backend's ``compute_dtype`` is what the trainer
hands the pipeline. The two backend modules share ``distributed.py`` and never import each other."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from dist_reid.config import ConfigError
from dist_reid.config.compare import config_changes
from dist_reid.config.schema import TrainConfig
from dist_reid.engine.distributed import (
    LAUNCHER_PRECISION_ENV,
    PrecisionChoice,
    TrainingBackend,
    launcher_precision,
    precision_dtype,
    resolve_precision,
)

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "dist_reid/engine"
LOGGER = "dist_reid.engine.distributed"
FROM_LAUNCHER = "from accelerate launch --mixed_precision"
FROM_CONFIG = "from train.mixed_precision"
NO_LAUNCHER = "train.mixed_precision auto, no launcher setting"


# -- the resolution table ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("configured", "launcher", "precision", "source", "warns"),
    [
        ("auto", None, "no", NO_LAUNCHER, False),
        ("auto", "no", "no", FROM_LAUNCHER, False),
        ("auto", "bf16", "bf16", FROM_LAUNCHER, False),
        ("auto", "fp16", "fp16", FROM_LAUNCHER, False),
        ("no", None, "no", FROM_CONFIG, False),
        ("bf16", None, "bf16", FROM_CONFIG, False),
        ("fp16", "fp16", "fp16", FROM_CONFIG, False),
        ("no", "bf16", "no", FROM_CONFIG, True),  # explicit wins over the launcher
        ("bf16", "no", "bf16", FROM_CONFIG, True),
        ("fp16", "bf16", "fp16", FROM_CONFIG, True),
        ("bf16", "fp8", "bf16", FROM_CONFIG, True),  # a launcher value we lack is only overridden
    ],
)
def test_resolution_table(configured, launcher, precision, source, warns):
    choice = resolve_precision(configured, launcher)
    assert (choice.precision, choice.source) == (precision, source)
    if warns:
        assert choice.warning is not None
        # both settings are named, and which one is used
        assert f"train.mixed_precision={configured}" in choice.warning
        assert f"--mixed_precision {launcher}" in choice.warning
        assert f"{LAUNCHER_PRECISION_ENV}={launcher}" in choice.warning
        assert f"training in {configured}" in choice.warning
    else:
        assert choice.warning is None


def test_an_unsupported_launcher_value_under_auto_is_one_clear_error():
    with pytest.raises(ValueError, match=r"ACCELERATE_MIXED_PRECISION='fp8' .*auto"):
        resolve_precision("auto", "fp8")


def test_launcher_setting_is_read_from_accelerates_variable():
    assert launcher_precision({}) is None
    assert launcher_precision({LAUNCHER_PRECISION_ENV: ""}) is None
    assert launcher_precision({LAUNCHER_PRECISION_ENV: "BF16"}) == "bf16"
    assert launcher_precision({"MIXED_PRECISION": "bf16"}) is None  # only accelerate's name


def test_the_one_precision_to_dtype_mapping():
    assert precision_dtype("no") is torch.float32
    assert precision_dtype("bf16") is torch.bfloat16
    assert precision_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match=r"'fp8' is not supported"):
        precision_dtype("fp8")
    assert PrecisionChoice("bf16", "x").describe() == "mixed precision bf16 (x)"


def test_schema_default_is_auto_and_values_are_checked():
    assert TrainConfig().mixed_precision == "auto"
    assert TrainConfig(mixed_precision="false").mixed_precision == "no"  # YAML's bare `no`
    with pytest.raises(ConfigError, match=r"train.mixed_precision: must be auto\|no\|bf16\|fp16"):
        TrainConfig(mixed_precision="fp32")


def test_precision_may_change_on_resume():
    # a run saved before `auto` existed ("no") resumes under the new default without a flag
    old = {"train": {"mixed_precision": "no", "lr": 0.1}}
    assert config_changes(old, {"train": {"mixed_precision": "auto", "lr": 0.1}}) == []
    assert config_changes(old, {"train": {"mixed_precision": "bf16", "lr": 0.2}}) == [
        ("train.lr", 0.1, 0.2)
    ]


def test_only_rank_zero_announces():
    noisy = PrecisionChoice("no", FROM_CONFIG, warning="both settings")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        TrainingBackend.announce_precision(types.SimpleNamespace(is_main=False), noisy)
        assert records == []
        TrainingBackend.announce_precision(types.SimpleNamespace(is_main=True), noisy)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "both settings"),
        (logging.INFO, "mixed precision no (from train.mixed_precision)"),
    ]


# -- the Accelerate backend -------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate(monkeypatch):
    """A single-process Accelerator per test: its state is process-wide and fixes the
    precision of the first one built."""
    from accelerate.state import AcceleratorState

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", LAUNCHER_PRECISION_ENV):
        monkeypatch.delenv(name, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    ("configured", "launcher", "dtype", "line", "warning"),
    [
        ("auto", None, torch.float32, f"mixed precision no ({NO_LAUNCHER})", None),
        ("auto", "bf16", torch.bfloat16, f"mixed precision bf16 ({FROM_LAUNCHER})", None),
        ("auto", "fp16", torch.float16, f"mixed precision fp16 ({FROM_LAUNCHER})", None),
        ("bf16", None, torch.bfloat16, f"mixed precision bf16 ({FROM_CONFIG})", None),
        (
            "no",
            "bf16",
            torch.float32,
            f"mixed precision no ({FROM_CONFIG})",
            "train.mixed_precision=no overrides accelerate launch --mixed_precision bf16 "
            "(ACCELERATE_MIXED_PRECISION=bf16): training in no; set train.mixed_precision=auto "
            "to follow the launcher",
        ),
    ],
)
def test_accelerate_backend_compute_dtype_and_its_log(
    fresh_accelerate, monkeypatch, caplog, configured, launcher, dtype, line, warning
):
    from dist_reid.engine.backend_factory import create_backend

    if launcher is not None:
        monkeypatch.setenv(LAUNCHER_PRECISION_ENV, launcher)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        backend = create_backend("accelerate", mixed_precision=configured)
    assert backend.compute_dtype is dtype
    assert (
        backend.accelerator.mixed_precision
        == {
            torch.float32: "no",
            torch.bfloat16: "bf16",
            torch.float16: "fp16",
        }[dtype]
    )  # what Accelerate really runs, not only what we report
    ours = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    expected = [(logging.WARNING, warning)] if warning else []
    assert ours == [*expected, (logging.INFO, line)]  # once


# -- the DeepSpeed backend: its JSON decides ----------------------------------------------------
BF16_JSON = REPO / "configs/deepspeed/zero2_bf16.json"
FP16_JSON = REPO / "configs/deepspeed/zero2_fp16.json"
OPEN = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def _settle(source, configured="auto", launcher=None):
    from dist_reid.engine.deepspeed_backend import _load_deepspeed_config

    return _load_deepspeed_config(
        source,
        mixed_precision=configured,
        grad_accum=1,
        grad_clip=None,
        micro_batch=1,
        launcher=launcher,
    )


@pytest.mark.parametrize(
    ("source", "configured", "launcher", "precision", "decided_by", "warns"),
    [
        (BF16_JSON, "auto", None, "bf16", f"from the DeepSpeed config {BF16_JSON}", False),
        (FP16_JSON, "auto", None, "fp16", f"from the DeepSpeed config {FP16_JSON}", False),
        # the JSON wins over the launcher under auto
        (BF16_JSON, "auto", "fp16", "bf16", f"from the DeepSpeed config {BF16_JSON}", True),
        (BF16_JSON, "bf16", None, "bf16", FROM_CONFIG, False),
        (BF16_JSON, "bf16", "no", "bf16", FROM_CONFIG, True),
        # "auto" sections follow the launcher, else stay off
        (OPEN, "auto", None, "no", NO_LAUNCHER, False),
        (OPEN, "auto", "bf16", "bf16", FROM_LAUNCHER, False),
        (OPEN, "fp16", "bf16", "fp16", FROM_CONFIG, True),
        ({}, "auto", None, "no", "from the DeepSpeed config deepspeed config", False),
        ({}, "auto", "bf16", "no", "from the DeepSpeed config deepspeed config", True),
    ],
)
def test_deepspeed_precision_table(source, configured, launcher, precision, decided_by, warns):
    cfg, choice = _settle(source, configured, launcher)
    assert (choice.precision, choice.source) == (precision, decided_by)
    assert (choice.warning is not None) == warns
    if warns:
        assert str(launcher) in choice.warning
    # the JSON handed to DeepSpeed says the same
    enabled = {k: bool(cfg.get(k, {}).get("enabled")) for k in ("bf16", "fp16")}
    assert enabled == {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def test_deepspeed_explicit_value_must_agree_with_the_json():
    # "no" used to mean "not set" (the old default); now it says fp32, which a bf16 JSON is not
    with pytest.raises(ValueError, match=r"train.mixed_precision='no' but .*zero2_bf16.json"):
        _settle(BF16_JSON, "no")
    with pytest.raises(ValueError, match=r"train.mixed_precision='fp16' but .*enables 'bf16'"):
        _settle(BF16_JSON, "fp16")


def test_deepspeed_backend_compute_dtype_comes_from_its_precision():
    from dist_reid.engine.deepspeed_backend import DeepSpeedBackend

    backend = object.__new__(DeepSpeedBackend)  # no process group: only the property
    for precision, dtype in (
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("no", torch.float32),
    ):
        backend.precision = precision
        assert backend.compute_dtype is dtype


_DS_PROBE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
from dist_reid.engine.backend_factory import create_backend
b = create_backend("deepspeed", deepspeed_config=sys.argv[1], mixed_precision="auto")
print("RESULT", json.dumps({"dtype": str(b.compute_dtype), "bf16": b.config["bf16"]["enabled"]}))
"""


@pytest.mark.deepspeed
@pytest.mark.slow
def test_deepspeed_backend_built_under_a_launcher_follows_its_json(tmp_path, free_port):
    pytest.importorskip("deepspeed")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(free_port()),
        LAUNCHER_PRECISION_ENV: "fp16",
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-c", _DS_PROBE, str(BF16_JSON)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    assert json.loads(line[len("RESULT ") :]) == {"dtype": "torch.bfloat16", "bf16": True}
    logs = proc.stderr
    assert f"INFO {LOGGER} mixed precision bf16 (from the DeepSpeed config {BF16_JSON})" in logs
    assert f"WARNING {LOGGER} accelerate launch --mixed_precision fp16 is ignored" in logs


# -- the trainer hands the backend's dtype to the pipeline ------------------------------------
def test_trainer_passes_the_backends_compute_dtype_to_the_pipeline(
    fresh_accelerate, monkeypatch, synthetic_trees, tmp_path
):
    from conftest import tiny_run_overrides

    from dist_reid.config import load_config
    from dist_reid.engine import build as build_module
    from dist_reid.engine.backends import AccelerateBackend

    class Stop(Exception):
        pass

    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(build_module, "build_train_pipeline", capture)
    root, _ = synthetic_trees["sysu"]
    cfg = load_config(
        str(REPO / "configs/experiments/demo_sysu_agw.yaml"),
        tiny_run_overrides(root, tmp_path, "run", "train.mixed_precision=no"),
    )
    # the config says "no": the dtype must come from the backend, not from the config string
    backend = AccelerateBackend(mixed_precision="bf16")
    with pytest.raises(Stop):
        build_module.build_trainer(cfg, backend=backend)
    assert seen["dtype"] is torch.bfloat16


# -- one shared module, no import between the two backends -------------------------------------
def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports: import statements at any depth (relative ones resolved
    within dist_reid.engine) and ``importlib.import_module("...")`` calls with a literal name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = ["dist_reid", "engine"][: max(0, 3 - node.level)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(str(node.args[0].value))
    return found


def test_the_backends_do_not_import_each_other():
    accelerate = _imported_modules(ENGINE / "backends.py")
    deepspeed = _imported_modules(ENGINE / "deepspeed_backend.py")
    shared = _imported_modules(ENGINE / "distributed.py")
    assert "dist_reid.engine.deepspeed_backend" not in accelerate
    assert "dist_reid.engine.backends" not in deepspeed
    # both build on the shared module, which imports neither (no cycle through it)
    assert "dist_reid.engine.distributed" in accelerate & deepspeed
    assert not {m for m in shared if m.startswith("dist_reid.")}
    factory = _imported_modules(ENGINE / "backend_factory.py")
    assert {"dist_reid.engine.backends", "dist_reid.engine.deepspeed_backend"} <= factory


def test_the_import_check_sees_dynamic_and_relative_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib\n"
        "from . import backends\n"
        "def f():\n"
        "    from .deepspeed_backend import X\n"
        "    return importlib.import_module('dist_reid.engine.other')\n"
    )
    found = _imported_modules(probe)
    assert "dist_reid.engine.backends" in found
    assert "dist_reid.engine.deepspeed_backend" in found
    assert "dist_reid.engine.other" in found
