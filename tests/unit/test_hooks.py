"""The loop and its hooks: call order, max_steps, cleanup on every way out, phase timing, and
that the benchmarks time the engine rather than a copy of its step."""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_reid.bench.methods import RepeatedBatch
from dist_reid.engine.backend_factory import create_backend
from dist_reid.engine.hooks import PHASES, HookBase, TimerHook
from dist_reid.engine.trainer import Trainer

BENCH = Path(__file__).resolve().parents[2] / "dist_reid" / "bench"
POINTS = (
    "on_fit_start",
    "before_train",
    "before_epoch",
    "before_step",
    "after_step",
    "after_epoch",
    "after_train",
)


class Linear(nn.Module):
    """The smallest model the loop accepts; ``forward_sleep`` seconds spent in forward."""

    batch_fields = ()
    output_keys = ("logits",)

    def __init__(self, forward_sleep: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.forward_sleep = forward_sleep

    def forward(self, images, modalities):
        time.sleep(self.forward_sleep)
        return {"logits": self.fc(images.flatten(1))}


class CrossEntropy(nn.Module):
    def __init__(self, sleep: float = 0.0) -> None:
        super().__init__()
        self.sleep = sleep

    def forward(self, outputs, labels, modalities):
        time.sleep(self.sleep)
        return {"id": nn.functional.cross_entropy(outputs["logits"], labels)}


class SlowBatches(RepeatedBatch):
    """Each batch arrives ``sleep`` seconds after it is asked for."""

    def __init__(self, batch, steps: int, sleep: float) -> None:
        super().__init__(batch, steps)
        self.sleep = sleep
        self.closed = 0

    def iterate(self, cursor: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().iterate(cursor):
            time.sleep(self.sleep)
            yield batch

    def close(self) -> None:
        self.closed += 1


class Recorder(HookBase):
    def __init__(self, calls: list[str], fail_at: str | None = None) -> None:
        self.calls = calls
        self.fail_at = fail_at
        self.closed = False

    def __getattribute__(self, name: str):
        if name in POINTS:

            def record() -> None:
                self.calls.append(f"{name}:{self.trainer.epoch}.{self.trainer.cursor}")
                if name == self.fail_at:
                    raise RuntimeError(f"hook failed in {name}")

            return record
        return super().__getattribute__(name)

    def close(self) -> None:
        self.closed = True


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.randn(n, 3, 2, 1, generator=g),
        "labels": torch.arange(n) % 3,
        "modalities": torch.arange(n) % 2,
    }


def _trainer(hooks, *, steps=3, epochs=2, max_steps=0, pipeline=None, model=None, loss=None):
    model = model or Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(
        model,
        loss or CrossEntropy(),
        pipeline or SlowBatches(_batch(), steps, 0.0),
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch),
        create_backend("accelerate", mixed_precision="no"),
        hooks,
        epochs=epochs,
        max_steps=max_steps,
    )


def test_hooks_run_at_each_point_in_order_and_the_model_trains():
    calls: list[str] = []
    trainer = _trainer([Recorder(calls)], steps=2, epochs=2)
    before = trainer.model.fc.weight.detach().clone()
    result = trainer.fit()
    per_epoch = lambda e: [  # noqa: E731
        f"before_epoch:{e}.0",
        f"before_step:{e}.0",
        f"after_step:{e}.1",
        f"before_step:{e}.1",
        f"after_step:{e}.2",
        f"after_epoch:{e + 1}.0",
    ]
    assert calls == [
        "on_fit_start:0.0",
        "before_train:0.0",
        *per_epoch(0),
        *per_epoch(1),
        "after_train:2.0",
    ]
    assert result["epochs_done"] == 2 and result["global_step"] == 4
    assert [r["epoch"] for r in trainer.history] == [0, 1]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)  # 2 epochs
    assert not torch.equal(before, trainer.model.fc.weight)


def test_max_steps_stops_inside_an_epoch_without_finishing_it():
    calls: list[str] = []
    trainer = _trainer([Recorder(calls)], steps=3, epochs=2, max_steps=4)
    trainer.fit()
    assert calls[-3:] == ["before_step:1.0", "after_step:1.1", "after_train:1.1"]
    assert calls.count("after_epoch:1.0") == 1 and (trainer.epoch, trainer.cursor) == (1, 1)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # one epoch stepped


class FailsToClose(HookBase):
    def close(self) -> None:
        raise OSError("stale file handle")


@pytest.mark.parametrize("point", ["on_fit_start", "before_train", "after_step", "after_epoch"])
def test_every_hook_and_the_pipeline_are_closed_when_a_hook_fails(point, caplog):
    """Also when a hook's own close fails: the others still close, the pipeline stops, and the
    error in flight is the one that propagates."""
    calls: list[str] = []
    first, failing, last = Recorder(calls), Recorder([], fail_at=point), Recorder([])
    trainer = _trainer([first, FailsToClose(), failing, last])
    with pytest.raises(RuntimeError, match=f"hook failed in {point}"):
        trainer.fit()
    assert first.closed and failing.closed and last.closed and trainer.pipeline.closed == 1
    assert "after_train:2.0" not in calls
    assert "closing FailsToClose failed" in caplog.text and "stale file handle" in caplog.text


def test_the_logging_hook_refuses_a_run_log_it_cannot_open(tmp_path):
    from dist_reid.engine.hooks import LoggingHook

    (tmp_path / "run").write_text("a file where the run folder should be")
    trainer = _trainer([LoggingHook(1, trackers=())])
    trainer.run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"^rank 0: the run's logs could not be opened: "):
        trainer.fit()
    assert trainer.global_step == 0


def test_epoch_lines_report_the_lr_each_epoch_trained_at(tmp_path, capsys):
    """The scheduler steps before ``after_epoch``; the line must still show the epoch's own lr
    (0.1, then 0.05 under ``0.5 ** epoch``), not the next epoch's."""
    from dist_reid.engine.hooks import LoggingHook

    trainer = _trainer([LoggingHook(1, trackers=())], steps=2, epochs=2)
    trainer.run_dir = tmp_path / "run"
    trainer.fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[3] for line in lines] == ["lr 1.00e-01", "lr 5.00e-02"]


def test_timer_attributes_each_phase_and_skips_warmup(monkeypatch):
    """A clock that moves only inside the data, forward and loss phases (by different amounts):
    each amount shows up in its own phase, nothing in the others."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    data_s, forward_s, loss_s = 0.003, 0.005, 0.011
    timer = TimerHook(warmup_steps=2)
    trainer = _trainer(
        [timer],
        steps=5,
        epochs=1,
        pipeline=SlowBatches(_batch(6), 5, data_s),
        model=Linear(forward_s),
        loss=CrossEntropy(loss_s),
    )
    trainer.fit()
    out = timer.summary()
    assert out["timed_steps"] == 3 and out["images_per_step"] == 6
    ms = {p: out[f"{p}_ms"] for p in PHASES}
    expected = {"data_wait": 3, "forward": 5, "loss": 11, "backward": 0, "optimizer": 0}
    assert ms == pytest.approx(expected, abs=1e-9)
    assert out["images_per_s"] == pytest.approx(6 / 0.019)
    assert out["timing"] == "perf_counter" and out["peak_memory_mib"] is None


def test_no_copy_of_the_training_step_in_the_benchmarks():
    """Only the kernel micro-benchmarks may call backward or an optimiser step themselves;
    training throughput goes through the engine's loop."""
    offenders = []
    for path in sorted(BENCH.glob("*.py")):
        if path.name == "kernels.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("backward", "step", "zero_grad")
            ):
                offenders.append(f"{path.name}:{node.lineno} .{node.func.attr}()")
    assert offenders == []
