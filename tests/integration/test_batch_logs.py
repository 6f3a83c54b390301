"""What a batch job's log shows: one line per epoch and the evaluation table on stdout, the same
in ``<run>/train.log``, no progress bar off a terminal, and the tracker's scalars."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from dist_reid.cli import main
from dist_reid.data.synthetic.layouts import generate

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/experiments/demo_sysu_agw.yaml")
EPOCH_LINE = re.compile(
    r"^epoch (\d)/2 \| (\d+) steps \| loss total [\d.e+-]+ .* \| lr [\d.e+-]+ \| [\d.]+ img/s \| "
    r"[\d.]+s \| ETA \d+:\d\d:\d\d$"
)


@pytest.mark.slow
def test_a_non_terminal_run_prints_one_line_per_epoch_and_its_evaluations(tmp_path, capsys, caplog):
    data = tmp_path / "data"
    generate("sysu", data, 12, seed=3, images_per_camera=2)  # 8 steps an epoch
    overrides = tiny_run_overrides(
        data,
        tmp_path,
        "run",
        "train.epochs=2",
        "train.eval_every=1",
        "train.log_every=3",
        "train.trackers=[tensorboard]",  # the tiny overrides have none; the tracker is tested here
    )
    assert main(["train", "-c", CONFIG, *overrides]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    epochs = [m for m in map(EPOCH_LINE.match, lines) if m]
    assert [m.group(1) for m in epochs] == ["1", "2"]
    assert {m.group(2) for m in epochs} == {"8"}
    # each epoch line is followed by its evaluation: a heading and a table with the all setting
    for m in epochs:
        i = lines.index(m.string)
        assert lines[i + 1] == f"evaluation of epoch {m.group(1)} (%, mean over trials):"
        assert lines[i + 2].split()[:3] == ["setting", "R1", "R5"]
        assert lines[i + 3].split()[0] == "all"
    assert "it/s" not in err and "epoch 0:" not in err  # no progress bar off a terminal
    assert "ETA 0:00:00" in epochs[1].string
    log = (tmp_path / "run" / "train.log").read_text()
    for m in epochs:
        assert m.string in log
    assert "training " in log and "evaluation of epoch 2" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "lr", "eval/all/mAP", "train/images_per_s"} <= tags
    assert [e.step for e in events.Scalars("loss/total")] == [3, 6, 9, 12, 15]
