"""Training entry point shared by ``launch/train.py``, ``dist-reid train`` and the demo.

Launch with ``accelerate launch --multi_gpu --num_processes N``, ``torchrun``, ``deepspeed`` or
``srun``: each only sets the usual environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dist_reid.config import load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train", description=__doc__)
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="a checkpoint, or no value for <run dir>/last.pt (no-op if the run finished)",
    )
    parser.add_argument("overrides", nargs="*")
    return parser


def train_main(argv: Sequence[str] | None = None) -> int:
    from dist_reid.engine.trainer import Trainer
    from dist_reid.models.pretrained import WeightsUnavailableError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config, args.overrides)
    try:
        trainer = Trainer(cfg)  # checks model.pretrained before reading any data
    except WeightsUnavailableError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    resume = args.resume
    if resume == "auto":
        candidate = trainer.run_dir / "last.pt"
        resume = candidate if candidate.is_file() else None
    result = trainer.fit(Path(resume) if resume else None)
    if trainer.backend.is_main and "last_epoch" in result:
        print(f"final: {result['last_epoch']}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
