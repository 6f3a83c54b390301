"""A real run survives its users: a batch with no negative per rank is refused before any data is
read; two runs never share a run folder; a resume with a changed config never mixes silently;
a corrupt test image is found before training and an evaluation crash never loses the epoch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from dist_reid.cli import main
from dist_reid.config import ConfigError, load_config
from dist_reid.data.sampler import build_sampler
from dist_reid.engine.build import build_trainer
from dist_reid.engine.checkpoint import load_checkpoint
from dist_reid.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/experiments/demo_sysu_agw.yaml")


def tiny(root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return tiny_run_overrides(root, out, name, *extra)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line]


# -- case 6: one identity per rank has no negative for the triplet loss ----------------------
def test_sampler_builder_refuses_one_identity_per_rank():
    pids = [p for p in range(16) for _ in range(4)]
    mods = ["visible", "infrared"] * (len(pids) // 2)
    with pytest.raises(ValueError) as excinfo:
        build_sampler("modality_balanced", pids, mods, 8, 2, num_replicas=8, rank=0)
    message = str(excinfo.value)
    assert "\n" not in message and "negative" in message
    assert "1 identity per rank" in message and ">= 2 x world size = 16" in message
    # two per rank is the least that works
    assert len(build_sampler("modality_balanced", pids, mods, 16, 2, num_replicas=8, rank=3)) > 0


def test_trainer_names_the_key_and_how_to_scale_it_before_reading_data(tmp_path):
    data = tmp_path / "data"  # generation on: reading the data would create it here
    cfg = load_config(
        CONFIG, tiny(data, tmp_path, "run", "data.synthetic.enabled=true", "train.ids_per_batch=8")
    )
    eight_ranks = types.SimpleNamespace(world_size=8, rank=0, is_main=True)
    with pytest.raises(ConfigError) as excinfo:
        build_trainer(cfg, backend=eight_ranks)
    message = str(excinfo.value)
    assert message.startswith("train.ids_per_batch: ") and "\n" not in message
    assert "triplet" in message and "use >= 2 x world size = 16" in message
    assert not data.exists()


def test_dist_reid_train_one_identity_per_batch_is_one_line_exit_2(tmp_path, capsys):
    data = tmp_path / "data"
    extra = ("data.synthetic.enabled=true", "train.ids_per_batch=1")  # generation on, as above
    argv = ["train", "-c", CONFIG, *tiny(data, tmp_path, "run", *extra)]
    argv.append("train.max_steps=1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1 and "train.ids_per_batch" in lines[0], err
    assert "use >= 2 x world size = 2" in lines[0]
    assert not data.exists() and not (tmp_path / "run").exists()


# -- case 5: a corrupt test image ------------------------------------------------------------
def _test_image(out: Path) -> tuple[list[str], Path]:
    """A tiny tree of its own (8 steps an epoch) and one of the images its evaluation reads."""
    from dist_reid.builders import build_dataset, evaluation_plan
    from dist_reid.data.synthetic.layouts import generate

    data = out / "data"
    generate("sysu", data, 12, seed=3, images_per_camera=2)
    overrides = tiny(data, out, "run", "train.epochs=1")
    cfg = load_config(CONFIG, overrides)
    dataset = build_dataset(cfg)
    records = evaluation_plan(cfg, dataset).records(dataset)
    return overrides, Path(records[len(records) // 2].path)


@pytest.mark.slow
def test_an_unreadable_test_image_is_refused_before_training(tmp_path, capsys, monkeypatch):
    overrides, bad = _test_image(tmp_path)
    bad.write_bytes(b"not an image at all")
    steps = []
    step = Trainer.train_step
    monkeypatch.setattr(
        Trainer, "train_step", lambda self, batch: steps.append(1) or step(self, batch)
    )
    assert main(["train", "-c", CONFIG, *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1 and str(bad) in lines[0] and "test" in lines[0], err
    assert steps == [] and not (tmp_path / "run" / "last.pt").exists()  # nothing trained


@pytest.mark.slow
def test_an_evaluation_crash_keeps_the_epoch_and_resume_only_evaluates(tmp_path, capsys):
    """A truncated JPEG passes the header check and breaks only when decoded, in evaluation:
    the epoch's last.pt is already written, and once the file is fixed the resume evaluates
    that epoch without training it again."""
    overrides, bad = _test_image(tmp_path)
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    assert main(["train", "-c", CONFIG, *overrides]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(bad) in lines[0], lines
    last = tmp_path / "run" / "last.pt"
    state = load_checkpoint(last, resume=True)
    assert (state["progress"]["epoch"], state["progress"]["cursor"]) == (1, 0)
    steps = state["progress"]["global_step"]
    assert steps > 0

    bad.write_bytes(good)
    assert main(["train", "-c", CONFIG, *overrides, "--resume"]) == 0
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["global_step"] == steps  # not trained again
    assert final["last_epoch"]["epoch"] == 0 and final["last_epoch"]["metrics"]["all"]["mAP"] >= 0
    history = json.loads(load_checkpoint(last, resume=True)["history"])
    assert [r["epoch"] for r in history] == [0] and "metrics" in history[0]


# -- case 4: resume with a changed config ----------------------------------------------------
@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 identities, 8 steps an epoch at P=4, K=2."""
    from dist_reid.data.synthetic.layouts import generate

    root = tmp_path_factory.mktemp("small") / "SYSU-MM01"
    generate("sysu", root, 12, seed=3, images_per_camera=2)
    return root


def test_resume_flags_parse_on_both_entries():
    from dist_reid.cli import build_parser
    from dist_reid.engine.run import parse_train_args

    args, _ = parse_train_args(["-c", "x.yaml", "--resume", "--allow-config-change", "a.b=1"])
    assert args.allow_config_change is True and args.overrides == ["a.b=1"]
    assert parse_train_args(["-c", "x.yaml", "--resume"])[0].allow_config_change is False
    args = build_parser().parse_args(["train", "-c", "x.yaml", "--allow-config-change"])
    assert args.allow_config_change is True


@pytest.mark.slow
def test_checkpoints_store_the_resolved_config(small_tree, tmp_path):
    from omegaconf import OmegaConf

    cfg = load_config(CONFIG, tiny(small_tree, tmp_path, "run", "train.epochs=1"))
    build_trainer(cfg).fit()
    expected = OmegaConf.to_container(OmegaConf.structured(cfg))
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(tmp_path / "run" / name)  # weights_only=True
        assert state["config"] == expected, name


@pytest.mark.slow
def test_resume_with_a_changed_config_is_refused_listing_the_keys(small_tree, tmp_path, capsys):
    base = ["train", "-c", CONFIG, *tiny(small_tree, tmp_path, "run")]
    assert main([*base, "train.max_steps=2"]) == 0
    run = tmp_path / "run"
    saved, written = (run / "last.pt").read_bytes(), (run / "config.yaml").read_text()
    changed = ["train.lr=0.5", "optim.lr_mults.backbone=0.1"]
    assert main([*base, "train.max_steps=4", *changed, "--resume"]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "train.lr 0.001 -> 0.5" in lines[0] and "optim.lr_mults.backbone 1.0 -> 0.1" in lines[0]
    assert "--allow-config-change" in lines[0] and "max_steps" not in lines[0]
    # nothing trained, nothing rewritten
    assert (run / "last.pt").read_bytes() == saved and (run / "config.yaml").read_text() == written
    # keys that do not change what is trained resume silently
    neutral = ["train.max_steps=3", "train.log_every=1", "train.checkpoint_every_steps=1"]
    assert main([*base, *neutral, "eval.flip=true", "--resume"]) == 0
    assert load_checkpoint(run / "last.pt")["progress"]["global_step"] == 3
    # another optimiser cannot take over the old one's state, even when changes are allowed
    capsys.readouterr()
    swap = ["train.max_steps=4", "optim.name=sgd", "--resume", "--allow-config-change"]
    assert main([*base, *swap]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "optim.name 'adamw' -> 'sgd' cannot change on resume" in lines[0]
    assert load_checkpoint(run / "last.pt")["progress"]["global_step"] == 3


@pytest.mark.slow
def test_allow_config_change_applies_the_new_values_and_records_both_configs(
    small_tree, tmp_path, caplog
):
    build_trainer(load_config(CONFIG, tiny(small_tree, tmp_path, "run", "train.max_steps=2"))).fit()
    run = tmp_path / "run"
    new = (
        "train.lr=0.5",
        "optim.lr_mults.backbone=0.1",
        "train.weight_decay=0.01",
        "train.epochs=4",
    )
    resumed = build_trainer(
        load_config(CONFIG, tiny(small_tree, tmp_path, "run", "train.max_steps=3", *new))
    )
    with caplog.at_level(logging.WARNING):
        resumed.fit(resume=run / "last.pt", allow_config_change=True)
    assert resumed.global_step == 3
    # the new values, not the optimiser state's old ones (epoch 0: schedule factor 1)
    groups = {g["name"]: g for g in resumed.optimizer.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(0.05) and groups["head"]["lr"] == 0.5
    assert groups["backbone"]["initial_lr"] == pytest.approx(0.05)
    assert all(g["weight_decay"] == 0.01 for g in groups.values())
    expected = [0.05 if g["name"] == "backbone" else 0.5 for g in resumed.optimizer.param_groups]
    assert resumed.scheduler.base_lrs == pytest.approx(expected)
    for change in ("train.lr 0.001 -> 0.5", "train.epochs 9 -> 4", "optim.lr_mults.backbone"):
        assert change in caplog.text
    assert "  lr: 0.5\n" in (run / "config.yaml").read_text()
    previous = sorted(run.glob("config.previous-*.yaml"))
    assert len(previous) == 1 and "  lr: 0.001\n" in previous[0].read_text()
    assert load_checkpoint(run / "last.pt")["config"]["train"]["lr"] == 0.5


@pytest.mark.slow
def test_an_older_checkpoint_without_a_config_is_checked_by_its_hash(small_tree, tmp_path, capsys):
    import torch

    base = ["train", "-c", CONFIG, *tiny(small_tree, tmp_path, "run")]
    assert main([*base, "train.max_steps=2"]) == 0
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, weights_only=True)
    state.pop("config", None)  # what an older version wrote
    torch.save(state, last)
    # config.yaml beside it matches the checkpoint's hash: compared key by key
    assert main([*base, "train.max_steps=2", "train.lr=0.5", "--resume"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "train.lr 0.001 -> 0.5" in lines[0], lines
    # without it, only the hash: a different one refuses
    (tmp_path / "run" / "config.yaml").unlink()
    assert main([*base, "train.max_steps=2", "train.lr=0.5", "--resume"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "config hash" in lines[0] and "--allow-config-change" in lines[0]
    assert main([*base, "train.max_steps=2", "--resume"]) == 0  # the same config: resumes


# -- case 3: two runs in one run folder ------------------------------------------------------
def _wait_for(condition, what: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
def test_a_second_run_in_a_live_runs_folder_is_refused_naming_the_holder(
    small_tree, tmp_path, capsys, caplog
):
    argv = ["train", "-c", CONFIG, *tiny(small_tree, tmp_path, "run", "train.max_steps=1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "dist_reid", *argv[:-1], "train.epochs=50"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    run = tmp_path / "run"
    try:
        _wait_for(lambda: (run / "config.yaml").is_file(), "the first run started", first)
        os.kill(first.pid, signal.SIGSTOP)  # alive, holding the folder, using no CPU
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = _error_lines(err)
        assert len(lines) == 1 and "Traceback" not in err, err
        line = lines[0]
        assert str(run) in line and f"pid {first.pid}" in line
        assert f"host {socket.gethostname()}" in line and "started 20" in line
        assert not (run / "last.pt").exists()  # the second run wrote nothing
    finally:
        first.kill()
        first.wait(timeout=60)
    # its holder killed: the lock it left is stale and the next run takes the folder over
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert f"pid {first.pid}" in caplog.text and "took over" in caplog.text
    assert load_checkpoint(run / "last.pt")["progress"]["global_step"] == 1


def test_a_lock_left_by_a_dead_pid_is_taken_over_and_one_process_may_reenter(tmp_path):
    from dist_reid.engine.runlock import acquire_run_lock, lock_holder, release_run_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "run.lock"
    stale = {"host": socket.gethostname(), "pid": dead.pid, "started": "2026-01-01T00:00:00Z"}
    lock.write_text(json.dumps(stale))
    previous = acquire_run_lock(tmp_path)
    assert previous == stale  # the dead run's record, taken over
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    assert acquire_run_lock(tmp_path) is None  # the same process again: re-entered, no takeover
    release_run_lock(tmp_path)
    release_run_lock(tmp_path)
    assert lock_holder(tmp_path) is None  # a clean end leaves nothing to take over


def test_a_folder_deleted_and_made_anew_is_locked_again(tmp_path):
    from dist_reid.engine.runlock import acquire_run_lock, lock_holder, release_run_lock

    folder = tmp_path / "run"
    acquire_run_lock(folder)
    shutil.rmtree(folder)
    assert acquire_run_lock(folder) is None
    assert lock_holder(folder)["pid"] == os.getpid()  # recorded in the new file
    release_run_lock(folder)
    assert lock_holder(folder) is None
