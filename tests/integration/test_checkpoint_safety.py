"""Checkpoints from an untrusted or damaged run folder: nothing in them runs, each failure is one
line naming the file, and a write killed half-way leaves no litter behind."""

from __future__ import annotations

import ast
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import error_lines, tiny_run_overrides

from dist_reid.config import load_config
from dist_reid.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/experiments/demo_sysu_agw.yaml")
SOURCES = ("dist_reid", "launch", "kernels")


def tiny(root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return tiny_run_overrides(root, out, name, *extra, eval_subset=False)


class _Payload:
    """Unpickling this creates ``marker``: stands for any code a tampered file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- case 1: no unpickling anywhere in the package --------------------------------------------
def _package_files() -> list[Path]:
    return [p for d in SOURCES for p in sorted((REPO / d).rglob("*.py"))]


def test_package_sources_never_unpickle():
    assert len(_package_files()) > 20  # the walk found the package
    offences = []
    for path in _package_files():
        text = path.read_text()
        where = path.relative_to(REPO)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "marshal"):
                loaders = [a.name for a in node.names if a.name.startswith(("load", "Unpickler"))]
                if loaders:
                    offences.append(f"{where}:{node.lineno}: imports {loaders}")
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            if owner in ("pickle", "dill", "marshal") and name.startswith(("load", "Unpickler")):
                offences.append(f"{where}:{node.lineno}: {owner}.{name}")
            if owner == "torch" and name == "load":
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offences.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            flag = kwargs.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                offences.append(f"{where}:{node.lineno}: allow_pickle not False")
        # the plain spellings too, in case a call hides them from the walk above
        for needle in ("weights_only=False", "allow_pickle=True", "pickle.load"):
            if needle in text.replace(" ", ""):
                offences.append(f"{where}: contains {needle}")
    assert offences == []


def test_a_pickled_object_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": _Payload(marker)}, "progress": {"epoch": 1}}, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message and "refused" in message
    assert "weights_only=False" not in message  # torch's own hint would be the wrong advice
    assert not marker.exists()


def test_eval_checkpoint_loading_refuses_pickles_and_empty_files_in_one_line(tmp_path):
    """``--checkpoint`` of eval/extract/export/plot reads through ``checkpoint_config`` and
    ``load_trained_model`` (and the library's ``load_model_weights``): safe, one line."""
    from dist_reid.engine.trained import checkpoint_config
    from dist_reid.models.backbones import load_model_weights

    marker = tmp_path / "ran"
    pickled, empty = tmp_path / "best.pt", tmp_path / "empty.pt"
    torch.save({"model": {"w": _Payload(marker)}}, pickled)
    empty.write_bytes(b"")
    for path, reason in ((pickled, "refused"), (empty, "empty")):
        with pytest.raises(ValueError) as excinfo:
            load_model_weights(torch.nn.Linear(2, 2), path)
        message = str(excinfo.value)
        assert "\n" not in message and str(path) in message and reason in message, message
        with pytest.raises(CheckpointError) as excinfo:
            checkpoint_config(path)
        message = str(excinfo.value)
        assert "\n" not in message and str(path) in message and reason in message, message
    assert not marker.exists()


@pytest.mark.deepspeed
@pytest.mark.slow
def test_deepspeed_resume_refuses_pickled_partition_bytes(synthetic_trees, tmp_path):
    """The optimizer bytes of a DeepSpeed ``last.pt`` (the layout an older version wrote, one
    uint8 tensor per rank) hold a ``__reduce__`` payload: resume refuses it in one line and the
    payload never runs."""
    pytest.importorskip("deepspeed")
    root, _ = synthetic_trees["sysu"]
    overrides = tiny(
        root,
        tmp_path,
        "ds",
        "train.max_steps=1",
        "train.backend=deepspeed",
        f"train.deepspeed_config={REPO / 'configs/deepspeed/zero2_bf16.json'}",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    train = [sys.executable, "-m", "dist_reid", "train", "-c", CONFIG]
    first = subprocess.run(
        [*train, *overrides], env=env, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stderr[-4000:]
    last = tmp_path / "ds" / "last.pt"
    state = torch.load(last, weights_only=True)
    # what the backend writes now: tensors and plain containers, no byte blobs
    parts = state["optimizer"]["deepspeed_zero_partitions"]
    assert len(parts) == 1 and isinstance(parts[0], dict)
    assert not any(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in _leaves(parts))

    marker = tmp_path / "payload-ran"
    blob = pickle.dumps(_Payload(marker))
    state["optimizer"] = {
        "deepspeed_zero_partitions": [torch.frombuffer(bytearray(blob), dtype=torch.uint8)],
        "world_size": 1,
    }
    torch.save(state, last)
    again = subprocess.run(
        [*train, *overrides, "--resume"], env=env, capture_output=True, text=True, timeout=600
    )
    assert not marker.exists(), "the checkpoint's payload ran"
    assert again.returncode == 2, again.stderr[-4000:]
    assert "Traceback" not in again.stderr
    errors = [line for line in again.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(last) in errors[0] and "pickled" in errors[0], errors


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


def test_zero_plain_encoding_round_trips_objects_onto_live_ones():
    """DeepSpeed's Python objects (loss scaler, enums, dataclasses) are saved as plain values and
    restored onto copies of the live objects, never rebuilt from names in the file."""
    import dataclasses
    import enum

    from dist_reid.engine.deepspeed_backend import from_plain, to_plain

    class Stage(enum.IntEnum):
        ONE = 1
        TWO = 2

    @dataclasses.dataclass
    class Address:
        numel: int
        start: int

    class Scaler:
        def __init__(self, scale: float) -> None:
            self.cur_scale = scale
            self.cur_iter = 0
            self.dtype = torch.float16

    saved = Scaler(1024.0)
    saved.cur_iter = 7
    state = {"stage": Stage.TWO, "scaler": saved, "map": [{"w": Address(5, 3)}], "t": torch.ones(2)}
    handle = io.BytesIO()
    torch.save(to_plain(state), handle)  # must survive a weights_only round trip
    handle.seek(0)
    plain = torch.load(handle, weights_only=True)
    live = {"stage": Stage.ONE, "scaler": Scaler(65536.0), "map": [{"w": Address(0, 0)}], "t": None}
    back = from_plain(plain, live)
    assert back["stage"] is Stage.TWO
    assert back["scaler"] is not live["scaler"] and type(back["scaler"]) is Scaler
    assert (back["scaler"].cur_scale, back["scaler"].cur_iter) == (1024.0, 7)
    assert live["scaler"].cur_scale == 65536.0  # the live object itself is untouched
    assert back["map"][0]["w"] == Address(5, 3)
    torch.testing.assert_close(back["t"], torch.ones(2))

    # a file may only set attributes the live object already has, on an object of the same class
    forged = dict(plain, scaler={**plain["scaler"], "attrs": {"__class__": 1}})
    with pytest.raises(ValueError, match="__class__"):
        from_plain(forged, live)
    with pytest.raises(ValueError, match="Scaler"):
        from_plain(plain, dict(live, scaler=Address(1, 1)))


@pytest.mark.deepspeed
def test_deepspeeds_own_objects_survive_the_weights_only_round_trip():
    """The objects DeepSpeed's ZeRO state really holds (fp16 dynamic loss scaler mid-run, the
    ZeRO stage enum, slice addresses) come back with their values and classes."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from dist_reid.engine.deepspeed_backend import from_plain, to_plain

    def scaler(scale: float) -> DynamicLossScaler:
        return DynamicLossScaler(
            init_scale=scale,
            scale_window=1000,
            min_scale=1,
            delayed_shift=2,
            consecutive_hysteresis=False,
        )

    running = scaler(2.0**16)
    # mid-run, after overflows: a halved scale, hysteresis used up
    running.cur_scale, running.cur_hysteresis = 2.0**15, 1
    running.cur_iter, running.last_overflow_iter = 123, 120
    state = {
        "loss_scaler": running,
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"w": fragment_address(numel=6, start=2)}],
    }
    handle = io.BytesIO()
    torch.save(to_plain(state), handle)
    handle.seek(0)
    live = {
        "loss_scaler": scaler(4.0),
        "zero_stage": ZeroStageEnum.optimizer_states,
        "param_slice_mappings": [{"w": fragment_address(numel=0, start=0)}],
    }
    back = from_plain(torch.load(handle, weights_only=True), live)
    assert type(back["loss_scaler"]) is DynamicLossScaler
    assert vars(back["loss_scaler"]) == vars(running)
    assert back["loss_scaler"].cur_scale == 2.0**15 and back["loss_scaler"].cur_iter == 123
    assert back["zero_stage"] is ZeroStageEnum.gradients
    assert back["param_slice_mappings"] == [{"w": fragment_address(numel=6, start=2)}]


# -- case 10: zero-byte checkpoints and best.pt given to --resume ----------------------------
def test_zero_byte_checkpoint_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message and "empty" in message


def _light(path: Path) -> Path:
    return save_checkpoint({"model": {"w": torch.ones(2)}, "progress": {"epoch": 3}}, path)


def test_best_pt_is_refused_for_resume_and_names_last_pt(tmp_path):
    best = _light(tmp_path / "best.pt")
    assert load_checkpoint(best)["progress"]["epoch"] == 3  # still fine to evaluate
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(best, resume=True)
    message = str(excinfo.value)
    assert "\n" not in message and str(best) in message
    assert "weights-only" in message and str(tmp_path / "last.pt") in message


@pytest.mark.slow
def test_trainer_resume_from_best_or_empty_file_is_one_clear_line(
    synthetic_trees, tmp_path, capsys
):
    """Through the command line: exit 2 and one line, no KeyError('config_hash')/IndexError."""
    from dist_reid.cli import main

    root, _ = synthetic_trees["sysu"]
    overrides = tiny(root, tmp_path, "run", "train.max_steps=1")
    run = tmp_path / "run"
    _light(run / "last.pt")  # a best.pt copied over last.pt, as users do
    assert main(["train", "-c", CONFIG, *overrides, "--resume"]) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "weights-only" in err and "last.pt" in err, err
    assert "config_hash" not in err
    (run / "last.pt").write_bytes(b"")
    assert main(["train", "-c", CONFIG, *overrides, "--resume"]) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert str(run / "last.pt") in err and "empty" in err, err


# -- case 7: temporaries of a write killed half-way ------------------------------------------
KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from dist_reid.engine.checkpoint import save_checkpoint

    def die(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = die
    save_checkpoint({"model": {}, "progress": {}}, sys.argv[1])
    """
)


def _killed_write(target: Path) -> list[Path]:
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], timeout=300)
    assert proc.returncode == -signal.SIGKILL
    return sorted(target.parent.glob(f".{target.name}.tmp-*"))


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    left = _killed_write(tmp_path / "last.pt")
    assert len(left) == 1  # the failure: a kill mid-write leaves its temporary behind
    host = socket.gethostname()
    mine = tmp_path / f".last.pt.tmp-{host}-{os.getpid()}"  # a write in progress: alive
    mine.write_bytes(b"x")
    old_style = tmp_path / f".best.pt.tmp-{left[0].name.rsplit('-', 1)[1]}"  # pid only
    old_style.write_bytes(b"x")
    elsewhere = tmp_path / ".last.pt.tmp-otherhost-1"  # another node's writer: pid unknowable
    elsewhere.write_bytes(b"x")
    abandoned = tmp_path / ".best.pt.tmp-otherhost-2"
    abandoned.write_bytes(b"x")
    hours_ago = time.time() - 3 * 3600
    os.utime(abandoned, (hours_ago, hours_ago))
    unrelated = tmp_path / "notes.tmp-1"
    unrelated.write_bytes(b"x")

    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([left[0], old_style, abandoned])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, elsewhere.name, unrelated.name]
    )


@pytest.mark.slow
def test_trainer_start_removes_a_killed_writers_temporary(synthetic_trees, tmp_path):
    from dist_reid.engine.build import build_trainer

    root, _ = synthetic_trees["sysu"]
    cfg = load_config(CONFIG, tiny(root, tmp_path, "run", "train.max_steps=1"))
    left = _killed_write(tmp_path / "run" / "last.pt")
    assert left and all(p.exists() for p in left)
    build_trainer(cfg)
    assert not any(p.exists() for p in left)
