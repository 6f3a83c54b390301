"""The training entries fail with one line and exit 2: launch/train.py (alone and under torchrun)
like ``dist-reid train``; the NaN guard names the term and the last good checkpoint;
``--resume`` is a flag, so an override after it is never read as a checkpoint path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides

import dist_reid.engine.build as build_module
from dist_reid.cli import build_parser as build_cli_parser
from dist_reid.cli import main
from dist_reid.engine.checkpoint import load_checkpoint
from dist_reid.engine.run import parse_train_args

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/experiments/demo_sysu_agw.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def tiny(root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return tiny_run_overrides(root, out, name, *extra)


def _our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line and "dist-reid" in line]


# -- case 14: --resume is a flag --------------------------------------------------------------
def _parse(*argv: str):
    return parse_train_args(list(argv))


def test_an_override_after_resume_is_an_override_not_a_checkpoint():
    args, note = _parse("-c", "x.yaml", "--resume", "run.name=x", "train.lr=0.5")
    assert args.resume is True and args.resume_from is None and note is None
    assert args.overrides == ["run.name=x", "train.lr=0.5"]
    args, note = _parse("-c", "x.yaml", "run.name=x", "--resume")
    assert args.resume is True and args.resume_from is None and args.overrides == ["run.name=x"]
    args, _ = _parse("-c", "x.yaml", "--resume", "eval.trials=[0,1]")
    assert args.resume is True and args.overrides == ["eval.trials=[0,1]"]
    args, _ = _parse("-c", "x.yaml", "a.b=1", "--resume", "c.d=2", "a.b=3")
    assert args.resume is True and args.overrides == ["a.b=1", "c.d=2", "a.b=3"]
    cli = build_cli_parser()
    args = cli.parse_args(["train", "-c", "x.yaml", "--resume", "run.name=x"])
    assert args.resume is True and args.overrides == ["run.name=x"]


def test_resume_from_is_the_explicit_path_and_the_old_form_still_works_with_a_note():
    args, note = _parse("-c", "x.yaml", "--resume-from", "runs/a/last.pt", "train.lr=1")
    assert args.resume_from == "runs/a/last.pt" and not args.resume and note is None
    for old in (["--resume", "runs/a/last.pt"], ["--resume=runs/a/last.pt"]):
        args, note = _parse("-c", "x.yaml", *old, "train.lr=1")
        assert args.resume_from == "runs/a/last.pt" and args.overrides == ["train.lr=1"]
        assert "deprecated" in note and "--resume-from runs/a/last.pt" in note
    # a path with '=' after a folder separator is still a path; 'auto' was the old flag value
    args, _ = _parse("-c", "x.yaml", "--resume", "runs/lr=0.1/last.pt")
    assert args.resume_from == "runs/lr=0.1/last.pt"
    args, note = _parse("-c", "x.yaml", "--resume", "auto")
    assert args.resume is True and args.resume_from is None


def test_dist_reid_train_resume_then_override_trains_the_named_run(synthetic_trees, tmp_path):
    root, _ = synthetic_trees["sysu"]
    common = [
        "train",
        "-c",
        CONFIG,
        *tiny(root, tmp_path, "a", "train.epochs=1", "train.max_steps=1"),
    ]
    # no last.pt yet: --resume starts fresh; the override after it names the run folder
    assert main([*common[:3], "--resume", *common[3:], "run.name=b"]) == 0
    assert (tmp_path / "b" / "last.pt").is_file() and not (tmp_path / "a").exists()
    # --resume with --resume-from (train.sbatch always adds --resume): the run's own last.pt
    # wins once it exists, so the PATH given at the first submission may even be gone by then
    gone = str(tmp_path / "gone.pt")
    # (two epochs instead of one: a change of what is trained, applied explicitly)
    again = [*common, "run.name=b", "train.epochs=2", "train.max_steps=2"]
    assert main([*again, "--resume", "--resume-from", gone, "--allow-config-change"]) == 0
    assert load_checkpoint(tmp_path / "b" / "last.pt")["progress"]["global_step"] == 2
    assert main([*common, "run.name=c", "--resume", "--resume-from", gone]) == 2


# -- case 13: launch/train.py ---------------------------------------------------------------
def test_launch_train_config_typo_is_one_line_exit_2():
    done = subprocess.run(
        [sys.executable, str(REPO / "launch/train.py"), "-c", CONFIG, "train.lrr=0.1"],
        capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lrr" in lines[0] and "'lr'" in lines[0]


def test_launch_train_missing_checkpoint_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope" / "last.pt"
    done = subprocess.run(
        [sys.executable, str(REPO / "launch/train.py"), "-c", CONFIG, "--resume-from", str(missing),
         f"run.output_dir={tmp_path}", f"data.root={tmp_path / 'data'}"],
        capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0]
    assert not (tmp_path / "data").exists()  # refused before any data was generated


@pytest.mark.slow
def test_torchrun_two_processes_config_typo_is_one_line_from_rank_0(free_port):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), str(REPO / "launch/train.py"), "-c", CONFIG,
         "train.lrr=0.1"],
        capture_output=True, text=True, env=ENV, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode != 0
    ours = _our_lines(done.stderr)
    assert len(ours) == 1 and "train.lrr" in ours[0], done.stderr[-3000:]
    # our processes print no traceback (torchrun's own failure summary may follow)
    assert "load_config" not in done.stderr and "ConfigError" not in done.stderr


# -- case 12: the NaN guard -------------------------------------------------------------------
def test_nan_guard_is_one_line_exit_2_naming_the_term_and_last_checkpoint(
    synthetic_trees, tmp_path, monkeypatch, capsys
):
    build_loss = build_module.build_loss
    poisoned_term = []

    def poisoned(cfg, **kwargs):
        loss = build_loss(cfg, **kwargs)
        calls = {"n": 0}

        class Poisoned:  # the loss contract: required_outputs and a call
            required_outputs = loss.required_outputs

            def __call__(self, outputs, labels, modalities):
                terms = dict(loss(outputs, labels, modalities))
                calls["n"] += 1
                if calls["n"] == 3:  # the third step: two steps done, one checkpointed
                    name = next(iter(terms))
                    poisoned_term.append(name)
                    terms[name] = terms[name] * torch.tensor(float("nan"))
                return terms

        return Poisoned()

    monkeypatch.setattr(build_module, "build_loss", poisoned)
    root, _ = synthetic_trees["sysu"]
    argv = ["train", "-c", CONFIG, *tiny(root, tmp_path, "nan", "train.checkpoint_every_steps=2")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = _our_lines(err)
    assert len(lines) == 1, err
    line = lines[0]
    last = tmp_path / "nan" / "last.pt"
    assert last.is_file() and f"last good checkpoint is {last} (global step 2)" in line
    assert "non-finite loss at epoch 0 step 2 (global step 3)" in line
    assert "non-finite loss" in line and f"'{poisoned_term[0]}': nan" in line


def test_other_ranks_leave_the_line_to_rank_0_and_speak_only_if_still_running(monkeypatch, capsys):
    import signal
    import time

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setenv("RANK", "1")
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert main(["config", "-c", CONFIG, "train.lrr=1"]) == 2
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    # waited for the launcher to stop it (rank 0 reports the same error), then said which rank
    assert slept and slept[0] >= 5
    err = capsys.readouterr().err.strip()
    assert err.startswith("dist-reid config: error (rank 1): ") and "train.lrr" in err
    monkeypatch.setenv("RANK", "0")
    slept.clear()
    assert main(["config", "-c", CONFIG, "train.lrr=1"]) == 2
    assert not slept and capsys.readouterr().err.startswith("dist-reid config: error: ")


def test_train_without_a_config_is_one_line(capsys):
    assert main(["train", "--resume"]) == 2
    assert capsys.readouterr().err.strip() == "dist-reid train: error: train needs -c CONFIG"
    # the old form is read as --resume-from with a note (then the same one-line error)
    assert main(["train", "--resume", "old/last.pt"]) == 2
    note, error = capsys.readouterr().err.strip().splitlines()
    assert "deprecated" in note and "--resume-from old/last.pt" in note
    assert error == "dist-reid train: error: train needs -c CONFIG"


def test_overrides_on_both_sides_of_a_flag_are_all_applied(capsys):
    argv = ["config", "-c", CONFIG, "train.lr=0.5", "--lr-schedule", "train.epochs=2"]
    assert main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2  # train.epochs=2 after the flag counted
    with pytest.raises(SystemExit):
        main(["config", "-c", CONFIG, "train.lr=0.5", "--lr-schedule", "--bogus"])
