"""What a run reports: rank-aware console logging, train.log, epoch and evaluation lines,
progress-bar setting, metric trackers and the cross-rank mean."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from dist_reid.config import ConfigError, load_config
from dist_reid.config.compare import RESUME_NEUTRAL_KEYS
from dist_reid.engine import run_log
from dist_reid.engine.run import rank_zero
from dist_reid.engine.run_log import (
    MetricTrackers,
    check_trackers,
    close_run_log,
    configure_logging,
    epoch_line,
    evaluation_lines,
    format_duration,
    launcher_rank,
    mean_across_ranks,
    open_run_log,
    progress_enabled,
    tqdm_disable,
    tracker_names,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs/experiments/demo_sysu_agw.yaml"


@pytest.fixture
def root_logger():
    """The root logger, put back as it was (handlers and level) after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def _ours(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if getattr(h, "_dist_reid_console", False)]


# -- ranks and console -----------------------------------------------------------------------
def test_launcher_rank_reads_rank_before_slurm_procid(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert launcher_rank() == 0 and rank_zero()
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert launcher_rank() == 3 and not rank_zero()
    monkeypatch.setenv("RANK", "0")  # torchrun inside srun: RANK is the global rank
    assert launcher_rank() == 0 and rank_zero()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK='one'"):
        launcher_rank()


def test_rank_one_drops_info_and_prefixes_its_warnings(root_logger, capsys, caplog):
    configure_logging(1)
    log = logging.getLogger("dist_reid.probe")
    log.info("resumed from x")
    log.warning("slow loader")
    err = capsys.readouterr().err
    assert err == "[rank 1] WARNING dist_reid.probe: slow loader\n"
    assert [r.getMessage() for r in caplog.records] == ["slow loader"]  # INFO never emitted


def test_rank_zero_logs_info_unprefixed_and_debug_when_verbose(root_logger, capsys):
    configure_logging(0)
    log = logging.getLogger("dist_reid.probe")
    log.debug("hidden")
    log.info("epoch 1/2")
    assert capsys.readouterr().err == "INFO dist_reid.probe: epoch 1/2\n"
    configure_logging(0, verbose=True)
    log.debug("shown")
    assert capsys.readouterr().err == "DEBUG dist_reid.probe: shown\n"


def test_configure_logging_is_idempotent(root_logger, capsys):
    configure_logging(0)
    configure_logging(0)
    configure_logging(2)
    assert len(_ours(root_logger)) == 1
    logging.getLogger("dist_reid.probe").error("once")
    assert capsys.readouterr().err == "[rank 2] ERROR dist_reid.probe: once\n"


# -- train.log -------------------------------------------------------------------------------
def test_train_log_appends_timestamped_info_lines(root_logger, tmp_path, capsys):
    configure_logging(0)
    run = tmp_path / "run"  # created by open_run_log
    handler = open_run_log(run)
    assert open_run_log(run) is handler  # no second handler, no doubled lines
    log = logging.getLogger("dist_reid.probe")
    log.debug("not in the file")
    log.info("epoch 1/2 | 4 steps")
    close_run_log(handler)
    log.info("after close")
    handler = open_run_log(run)  # a resumed run continues the file
    log.warning("resumed")
    close_run_log(handler)
    close_run_log(None)
    lines = (run / "train.log").read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert len(lines) == 2, lines
    assert re.fullmatch(stamp + r" INFO dist_reid\.probe: epoch 1/2 \| 4 steps", lines[0])
    assert re.fullmatch(stamp + r" WARNING dist_reid\.probe: resumed", lines[1])
    capsys.readouterr()


# -- human lines -----------------------------------------------------------------------------
def test_epoch_line_exact():
    line = epoch_line(
        epoch=3,
        epochs=81,
        steps=120,
        losses={"id": 0.56781, "total": 1.23456, "tri": 0.666666},
        lr=0.1,
        images_per_s=412.345,
        seconds=65.24,
        eta_s=5113.4,  # 1 h 25 min 13.4 s
    )
    assert line == (
        "epoch 3/81 | 120 steps | loss total 1.235 id 0.5678 tri 0.6667 | lr 1.00e-01 | "
        "412.3 img/s | 65.2s | ETA 1:25:13"
    )
    line = epoch_line(
        epoch=1,
        epochs=1,
        steps=2,
        losses={"id": 12345.6, "center": 3.2e-05},
        lr=3.5e-4,
        images_per_s=8.0,
        seconds=0.04,
        eta_s=None,
    )
    assert (
        line
        == "epoch 1/1 | 2 steps | loss id 1.235e+04 center 3.2e-05 | lr 3.50e-04 | 8.0 img/s | 0.0s"
    )


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(100000) == "27:46:40"
    assert format_duration(-5) == "0:00:00"


def test_evaluation_lines_table():
    lines = evaluation_lines(
        {
            "all": {
                "R1": 45.123,
                "R5": 70.0,
                "R10": 80.0,
                "R20": 90.5,
                "mAP": 43.219,
                "mINP": 30.0,
            },
            "indoor": {
                "R1": 50.0,
                "R5": 75.0,
                "R10": 85.5,
                "R20": 93.0,
                "mAP": 55.5,
                "mINP": 100.0,
            },
        }
    )
    assert lines == [
        "setting     R1     R5    R10    R20    mAP    mINP",
        "all      45.12  70.00  80.00  90.50  43.22   30.00",
        "indoor   50.00  75.00  85.50  93.00  55.50  100.00",
    ]
    # protocol order first, then other keys; a missing metric is '-'
    assert evaluation_lines({"v2t": {"mAP": 1.0, "extra": 2.0, "R1": 3.0}, "t2v": {"R1": 4.0}}) == [
        "setting    R1   mAP  extra",
        "v2t      3.00  1.00   2.00",
        "t2v      4.00     -      -",
    ]
    assert evaluation_lines({}) == []


# -- progress bars ---------------------------------------------------------------------------
def test_progress_setting_maps_to_tqdm_disable():
    assert [progress_enabled(v) for v in ("auto", "true", "false", None, True, False)] == [
        None, True, False, None, True, False,
    ]  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"train\.progress_bar: must be one of auto\|true\|false, got 'sometimes'"
    ):
        progress_enabled("sometimes")
    assert tqdm_disable("auto", is_main=True) is None
    assert tqdm_disable("true", is_main=True) is False
    assert tqdm_disable("false", is_main=True) is True
    assert tqdm_disable("true", is_main=False) is True  # never a bar off rank 0
    # auto: tqdm's own check turns the bar off on a stream that is not a terminal
    assert tqdm(total=1, file=io.StringIO(), disable=tqdm_disable("auto", True)).disable
    assert not tqdm(total=1, file=io.StringIO(), disable=tqdm_disable("true", True)).disable


def test_config_keys_validated_and_resume_neutral():
    cfg = load_config(CONFIG)
    assert cfg.train.trackers == ("tensorboard",) and cfg.train.progress_bar == "auto"
    cfg = load_config(CONFIG, ["train.progress_bar=false", "train.trackers=[]"])
    assert cfg.train.progress_bar == "false" and cfg.train.trackers == ()
    with pytest.raises(ConfigError, match=r"train\.trackers: unknown tracker 'tensorbord'"):
        load_config(CONFIG, ["train.trackers=[tensorbord]"])
    with pytest.raises(ConfigError, match=r"train\.trackers: names a tracker twice"):
        load_config(CONFIG, ["train.trackers=[aim,aim]"])
    with pytest.raises(ConfigError, match=r"train\.progress_bar: must be auto\|true\|false"):
        load_config(CONFIG, ["train.progress_bar=yes please"])
    assert {"train.trackers", "train.progress_bar"} <= set(RESUME_NEUTRAL_KEYS)


# -- trackers --------------------------------------------------------------------------------
def test_tensorboard_tracker_writes_scalars_readable_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = MetricTrackers(["tensorboard"], tmp_path, run_name="probe")
    trackers.log({"loss/total": 1.5, "lr": torch.tensor(0.1).item()}, step=3)
    trackers.log({"loss/total": 0.25}, step=4)
    trackers.log_config({"train": {"lr": 0.1, "milestones": (20, 50)}})  # tensorboard: skipped
    trackers.finish()
    trackers.finish()  # idempotent
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("loss/total")]
    assert scalars == [(3, 1.5), (4, 0.25)]
    assert [e.step for e in events.Scalars("lr")] == [3]
    assert [p.name for p in (tmp_path / "tensorboard").iterdir() if p.is_dir()] == []


def test_trackers_off_rank_zero_write_nothing(tmp_path):
    trackers = MetricTrackers(["tensorboard"], tmp_path / "run", run_name="probe", enabled=False)
    trackers.log({"loss/total": 1.0}, step=1)
    trackers.log_config({"train": {"lr": 0.1}})
    trackers.finish()
    assert not trackers.active and not (tmp_path / "run").exists()


def test_unknown_or_missing_tracker_is_one_config_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"train\.trackers: unknown tracker 'neptune'"):
        check_trackers(["tensorboard", "neptune"])
    monkeypatch.setattr(run_log, "_available", lambda name: name != "wandb")
    with pytest.raises(ConfigError, match=r"train\.trackers: 'wandb' is not installed"):
        MetricTrackers(["tensorboard", "wandb"], "unused", run_name="probe", enabled=False)
    check_trackers(["tensorboard", "mlflow"])  # every other one passes


def test_deprecated_tensorboard_false_drops_tensorboard(caplog):
    cfg = load_config(CONFIG, ["train.tensorboard=false"])
    with caplog.at_level(logging.WARNING, logger="dist_reid.engine.run_log"):
        assert tracker_names(cfg.train) == ()
    assert "train.tensorboard is deprecated" in caplog.text
    caplog.clear()
    off_rank_zero = MetricTrackers.from_config(cfg, "unused", enabled=False)
    assert off_rank_zero.names == () and not caplog.records  # warned once, by rank 0
    cfg = load_config(CONFIG, ["train.trackers=[tensorboard,mlflow]", "train.tensorboard=false"])
    assert tracker_names(cfg.train) == ("mlflow",)
    assert tracker_names(load_config(CONFIG).train) == ("tensorboard",)


# -- cross-rank mean -------------------------------------------------------------------------
def test_mean_across_ranks_is_identity_without_a_group():
    assert mean_across_ranks({"a": 1, "b": 2.5}, torch.device("cpu")) == {"a": 1.0, "b": 2.5}


def _mean_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # the keys in a different order on each rank: reduced by name, not position
        values = {"loss/total": 1.0 + 2 * rank, "lr": 0.1, "b": 3.0 * rank}
        if rank:
            values = dict(reversed(list(values.items())))
        means = mean_across_ranks(values, torch.device("cpu"))
        Path(out, f"rank{rank}.json").write_text(json.dumps(list(means.items())))
    finally:
        dist.destroy_process_group()


def test_mean_across_ranks_two_gloo_processes(tmp_path, free_port):
    torch.multiprocessing.spawn(_mean_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == [["loss/total", 2.0], ["lr", pytest.approx(0.1)], ["b", 1.5]]
    assert rank1 == [["b", 1.5], ["lr", pytest.approx(0.1)], ["loss/total", 2.0]]


def test_log_config_flattens_for_trackers_that_keep_hyperparameters(monkeypatch, tmp_path):
    class Fake:
        def __init__(self) -> None:
            self.config, self.logged = None, []

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self) -> None:
            pass

    built = {}
    monkeypatch.setattr(run_log, "_available", lambda name: True)
    monkeypatch.setattr(
        MetricTrackers, "_build", lambda self, name, run_name: built.setdefault(name, Fake())
    )
    trackers = MetricTrackers(["tensorboard", "mlflow"], tmp_path, run_name="probe")
    trackers.log_config({"train": {"lr": 0.1, "milestones": (20, 50), "cap": None}, "x": {}})
    trackers.log({"loss/total": torch.tensor(2.0)}, step=7)
    assert built["tensorboard"].config is None  # config.yaml beside the events is the record
    assert built["mlflow"].config == {
        "train.lr": 0.1, "train.milestones": "[20, 50]", "train.cap": None,
    }  # fmt: skip
    assert built["mlflow"].logged == [(7, {"loss/total": 2.0})]  # plain floats
