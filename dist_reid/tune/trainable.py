"""The function trainable: one trial = one engine run reporting every epoch to Ray Tune."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dist_reid.tune.space import SweepSpec, trial_config

STARTED_MARKER = "started.txt"  # one line per (re)start of a trial; tests count them


def run_trial(params: dict[str, Any], spec: SweepSpec) -> None:
    """Train the base config with this trial's values, evaluating and reporting every epoch,
    checkpointing through Tune so a paused or restored trial continues from its last epoch."""
    from ray import tune

    from dist_reid.engine.build import build_trainer
    from dist_reid.engine.trainer import Trainer

    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    trial_dir = Path(tune.get_context().get_trial_dir())
    with open(trial_dir / STARTED_MARKER, "a") as marker:
        marker.write("start\n")
    cfg = trial_config(
        spec,
        params,
        (
            f"run.output_dir={trial_dir}",
            "run.name=run",
            "train.eval_every=1",
            "train.trackers=[]",
        ),
    )
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            target = trial_dir / "run" / "last.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(directory) / "last.pt", target)
            resume = target

    def report(trainer: Trainer, record: dict[str, Any]) -> None:
        if "metrics" not in record:
            return
        with tempfile.TemporaryDirectory() as directory:
            shutil.copyfile(trainer.run_dir / "last.pt", Path(directory) / "last.pt")
            tune.report(
                {**record["metrics"], "epoch": record["epoch"] + 1},
                checkpoint=tune.Checkpoint.from_directory(directory),
            )

    build_trainer(cfg, callbacks=[report]).fit(resume)
