"""Training entry point shared by ``launch/train.py``, ``dist-reid train`` and the demo.

Launch with ``accelerate launch --multi_gpu --num_processes N``, ``torchrun``, ``deepspeed`` or
``srun``: each only sets the usual environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from dist_reid.config import load_config
from dist_reid.engine.run_log import configure_logging, launcher_rank

# A dotted override (``train.lr=0.5``, ``eval.trials=[0,1]``): never a checkpoint path.
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]-]*=")


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """``--resume`` (a flag), ``--resume-from PATH`` and ``--allow-config-change``, shared with
    ``dist-reid train``."""
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue <run dir>/last.pt if it exists, else start fresh (no-op if the run finished)",
    )
    parser.add_argument(
        "--resume-from",
        metavar="PATH",
        help="continue this checkpoint; with --resume, only while <run dir>/last.pt does not "
        "exist yet (a requeued job continues its own progress)",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the config changes what is trained (e.g. train.lr): the new "
        "values replace the checkpoint's (lr groups, epochs, schedule); both configs are kept "
        "in the run folder. Without it such a resume is refused, listing the changed keys",
    )


def legacy_resume_args(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """Rewrite the old ``--resume PATH`` / ``--resume=PATH`` as ``--resume-from PATH``.

    The old ``--resume`` took an optional value, so ``--resume run.name=x`` read the override as
    a path; a token after ``--resume`` is a path only if it is neither an option nor shaped like
    an override. Returns the tokens and a deprecation note (None when nothing was rewritten).
    """
    tokens, note, i = [], None, 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        path = None
        if token.startswith("--resume="):
            path = token.partition("=")[2]
        elif (
            token == "--resume"
            and i + 1 < len(argv)
            and not argv[i + 1].startswith("-")
            and not _OVERRIDE.match(argv[i + 1])
        ):
            i += 1
            path = argv[i]
        if path is None or path == "auto":  # 'auto' was the old flag's own value
            tokens.append("--resume" if path == "auto" else token)
        else:
            tokens += ["--resume-from", path]
            note = f"--resume PATH is deprecated: use --resume-from {path} (--resume is a flag now)"
        i += 1
    return tokens, note


def rank_zero() -> bool:
    """Rank 0 of a launcher (torchrun/accelerate set RANK, srun SLURM_PROCID), or no launcher."""
    return launcher_rank() == 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train", description=__doc__)
    parser.add_argument("--config", "-c", required=True)
    add_resume_arguments(parser)
    parser.add_argument("overrides", nargs="*")
    return parser


def parse_train_args(argv: Sequence[str]) -> tuple[argparse.Namespace, str | None]:
    """The parsed arguments (old ``--resume PATH`` rewritten; overrides may sit on both sides of
    a flag) and the deprecation note, if any."""
    tokens, note = legacy_resume_args(argv)
    return build_parser().parse_intermixed_args(tokens), note


def train_main(argv: Sequence[str] | None = None) -> int:
    from dist_reid.engine.build import build_trainer
    from dist_reid.engine.checkpoint import CheckpointError
    from dist_reid.engine.cpu_threads import configure_threads
    from dist_reid.models.pretrained import WeightsUnavailableError

    args, note = parse_train_args(sys.argv[1:] if argv is None else argv)
    if note and rank_zero():
        print(f"train: warning: {note}", file=sys.stderr)
    # `dist-reid --verbose train` set DEBUG before calling here: keep it
    configure_logging(launcher_rank(), verbose=logging.getLogger().level == logging.DEBUG)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config, args.overrides)
    own = Path(cfg.run.output_dir) / cfg.run.name / "last.pt"
    if args.resume and own.is_file():
        args.resume_from = None
    if args.resume_from and not Path(args.resume_from).is_file():  # before any data is built
        raise CheckpointError(f"checkpoint {args.resume_from} does not exist (--resume-from)")
    try:
        # after the argument checks, so a bad command line stays one line on stderr
        configure_threads(announce=rank_zero())  # cores / local processes, or OMP_NUM_THREADS
        trainer = build_trainer(cfg)  # checks model.pretrained before reading any data
    except WeightsUnavailableError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    resume = args.resume_from
    if args.resume and (trainer.run_dir / "last.pt").is_file():
        resume = trainer.run_dir / "last.pt"
    result = trainer.fit(
        Path(resume) if resume else None, allow_config_change=args.allow_config_change
    )
    if trainer.backend.is_main and "last_epoch" in result:  # the table was printed with it
        last = result["last_epoch"]
        print(f"done: epoch {last['epoch'] + 1} scored last; {trainer.run_dir / 'metrics.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
