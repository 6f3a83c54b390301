"""``dist-reid`` command line: synth, eval, extract, demo, bench, config, weights."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_DEMO_CONFIG = "configs/experiments/demo_sysu_agw.yaml"

# Errors a user can fix from the message alone: print one line, no traceback. FloatingPointError
# is the training NaN guard's (it names the term and the last good checkpoint).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    OSError,
    RuntimeError,
    FloatingPointError,
)


def _config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--config", "-c", default=default, help="YAML config (with _base_ inheritance)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. train.lr=3e-4 data.root=/data/SYSU-MM01",
    )


def _cmd_synth(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from dist_reid.data.synthetic.layouts import generate

    with Progress(transient=True) as progress:
        task = progress.add_task(f"synthetic {args.layout}", total=None)
        summary = generate(
            args.layout,
            args.root,
            args.num_ids,
            args.seed,
            args.images_per_camera,
            overwrite=args.overwrite,
            progress=lambda n: progress.advance(task, n),
        )
    total = sum(summary.images.values())
    print(
        f"wrote {total} images of {args.num_ids} identities to {summary.root} in {summary.seconds:.1f} s "
        f"({60 * total / max(summary.seconds, 1e-9):.0f} images/min)"
    )
    for key, count in sorted(summary.images.items()):
        print(f"  {key:>18}: {count:6d} images, cameras {summary.cams[key]}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from dist_reid.engine.evaluate import run_evaluation
    from dist_reid.engine.trained import checkpoint_config, evaluation_dir, read_trained_state

    state = read_trained_state(args.checkpoint)  # read once, for the config and the weights
    cfg = checkpoint_config(args.checkpoint, args.config, args.overrides, state=state)
    run_evaluation(
        cfg,
        checkpoint=args.checkpoint,
        checkpoint_state=state,
        features=args.features,
        untrained=args.untrained,
        out_dir=evaluation_dir(args.checkpoint, cfg, args.name),
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dist_reid.engine.run import train_main

    if not args.config:
        raise ValueError("train needs -c CONFIG")
    resume = ["--resume"] if args.resume else []
    if args.resume_from:
        resume += ["--resume-from", args.resume_from]
    if args.allow_config_change:
        resume.append("--allow-config-change")
    return train_main(["--config", args.config, *resume, *args.overrides])


def _cmd_demo(args: argparse.Namespace) -> int:
    """Generate the data once, train on N local processes (torchrun), then score the last epoch
    on the full protocol beside the chance level."""
    import subprocess

    from dist_reid.builders import check_pretrained, ensure_synthetic
    from dist_reid.config import load_config
    from dist_reid.engine.cpu_threads import threads_per_process
    from dist_reid.engine.evaluate import run_evaluation

    cfg = load_config(args.config, args.overrides)
    if cfg.train.epochs:
        check_pretrained(cfg)  # offline without cached weights: fail before generating data
    ensure_synthetic(cfg)
    if cfg.train.epochs == 0:
        run_evaluation(cfg, untrained=True)
        return 0
    share = threads_per_process({**os.environ, "LOCAL_WORLD_SIZE": str(args.processes)})
    env = {**os.environ, "OMP_NUM_THREADS": str(share)}  # each process its share of the cores
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(args.processes),
        "-m",
        "dist_reid",  # 'dist-reid train': one line per error, like here
        "train",
        "--config",
        args.config,
        *args.overrides,
    ]
    print("running:", " ".join(command))
    if subprocess.run(command, env=env).returncode != 0:
        raise RuntimeError("demo training failed (see the log above)")
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    run_evaluation(cfg, checkpoint=str(run_dir / "last.pt"))
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from dist_reid.builders import build_dataset, build_model, evaluation_plan
    from dist_reid.engine.evaluate import save_features
    from dist_reid.engine.trained import (
        checkpoint_config,
        load_trained_model,
        read_trained_state,
    )
    from dist_reid.evaluation.features import extract_features

    if not (args.checkpoint or args.untrained):
        raise ValueError("give --checkpoint, or --untrained to extract with random weights")
    state = read_trained_state(args.checkpoint)  # read once, for the config and the weights
    cfg = checkpoint_config(args.checkpoint, args.config, args.overrides, state=state)
    dataset = build_dataset(cfg)
    if args.checkpoint:
        model = load_trained_model(args.checkpoint, cfg, dataset.num_train_ids, state=state)
    else:
        model = build_model(cfg, dataset.num_train_ids, pretrained=False)
    # every trial's images: the file may later be scored on any of them
    plan = evaluation_plan(cfg, dataset, every_trial=True)
    records = plan.records(dataset)
    feats = extract_features(
        model,
        records,
        plan.transform(),
        batch_size=plan.batch_size,
        num_workers=cfg.data.num_workers,
        flip=plan.flip,
    )
    path = save_features(args.out, dataset, records, feats)
    print(f"wrote {feats.shape[0]} features of dimension {feats.shape[1]} to {path}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from dist_reid.tune import load_sweep
    from dist_reid.tune.run import run_sweep

    outputs = run_sweep(load_sweep(args.config, tuple(args.overrides)), resume=args.resume)
    print(outputs.table_md.read_text())
    for path in (outputs.table_csv, outputs.best_config, outputs.heatmap):
        if path is not None:
            print(f"wrote {path}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    if args.compare:
        from dist_reid.viz.report import compare_cmc

        print(f"wrote {compare_cmc(args.compare, args.out / 'cmc_compare.png', args.setting)}")
        return 0
    from dist_reid.engine.figures import model_figures
    from dist_reid.engine.trained import checkpoint_config, read_trained_state

    if not (args.checkpoint or args.untrained):
        raise ValueError(
            "plot needs --checkpoint (or -c with --untrained), or --compare RUN_DIR ..."
        )
    state = read_trained_state(args.checkpoint)  # read once, for the config and the weights
    cfg = checkpoint_config(args.checkpoint, args.config, args.overrides, state=state)
    figures = model_figures(
        cfg, args.checkpoint, args.out, trial=args.trial, checkpoint_state=state
    )
    for path in figures:
        print(f"wrote {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from dist_reid.viz.report import write_report

    for path in write_report(args.run):
        print(f"wrote {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dist_reid.engine.export import export_onnx
    from dist_reid.engine.trained import checkpoint_config, read_trained_state

    if not (args.checkpoint or args.untrained):
        raise ValueError("export needs --checkpoint (or --untrained for random weights)")
    state = read_trained_state(args.checkpoint)  # read once, for the config and the weights
    cfg = checkpoint_config(args.checkpoint, args.config, args.overrides, state=state)
    exported = export_onnx(cfg, args.checkpoint, args.out, checkpoint_state=state)
    for modality, info in exported.items():
        print(f"wrote {info['file']} ({modality}; max |onnx - eager| = {info['max_abs_diff']:.2e})")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from dist_reid.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.lr_schedule:
        import json

        from dist_reid.builders import schedule_options
        from dist_reid.engine.schedules import lr_schedule

        print(
            json.dumps(
                lr_schedule(epochs=cfg.train.epochs, lr=cfg.train.lr, **schedule_options(cfg))
            )
        )
        return 0
    print(to_yaml(cfg), end="")
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    """Download (or find) a backbone's ImageNet weights in the Hugging Face cache."""
    from dist_reid.models.pretrained import IMAGENET, fetch_weights

    if args.backbone:
        backbone = args.backbone
    else:
        from dist_reid.config import load_config

        if not args.config:
            raise ValueError("weights fetch needs -c CONFIG or --backbone NAME")
        cfg = load_config(args.config, args.overrides)
        if cfg.model.pretrained != IMAGENET:
            raise ValueError(
                f"{args.config}: model.pretrained is {cfg.model.pretrained!r}, not imagenet: "
                "nothing to fetch"
            )
        backbone = cfg.model.backbone
    tag, path = fetch_weights(backbone)
    print(f"{backbone}: {tag} -> {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "eval":
        from dist_reid.bench.eval_speed import main as suite
    elif args.suite == "loader":
        from dist_reid.bench.loader import main as suite
    elif args.suite == "methods":
        from dist_reid.bench.methods import main as suite
    elif args.suite == "accuracy":
        from dist_reid.bench.accuracy import main as suite
    elif args.suite == "gpu":
        from dist_reid.bench.gpu import main as suite
    elif args.suite in ("train", "scaling"):
        from dist_reid.bench.train import main as bench_train

        return bench_train(args.rest, suite=args.suite) or 0
    else:
        from dist_reid.bench.kernels import main as suite
    return suite(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-reid", description=__doc__)
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="debug logging and full tracebacks"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic SYSU-MM01 / RegDB / LLCM tree")
    p.add_argument("--layout", required=True, choices=("sysu", "regdb", "llcm"))
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--num-ids", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--images-per-camera", type=int, default=None, help="mean images per (identity, camera)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing tree at --root")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("eval", help="run a dataset's full test protocol and print the table")
    _config_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", help="model weights file ('{trial}' expands per RegDB trial)"
    )
    source.add_argument(
        "--features", help="features saved by 'dist-reid extract' ('{trial}' as above)"
    )
    source.add_argument(
        "--untrained", action="store_true", help="random-init model (a sanity floor)"
    )
    p.add_argument(
        "--name", help="folder under <run>/eval/ for this evaluation (default: the UTC time)"
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("extract", help="save features of every test image a protocol may use")
    _config_args(p)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--checkpoint")
    p.add_argument("--untrained", action="store_true")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("train", help="train one process (or one rank under a launcher)")
    _config_args(p)
    from dist_reid.engine.run import add_resume_arguments

    add_resume_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "demo", help="the embedded default job: synthetic SYSU-MM01, AGW on 2 CPU processes"
    )
    _config_args(p, DEFAULT_DEMO_CONFIG)
    p.add_argument("--processes", type=int, default=2, help="local training processes")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("tune", help="a Ray Tune sweep from a YAML search space")
    p.add_argument("--config", "-c", required=True, help="sweep file (configs/tune/*.yaml)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="restore an interrupted sweep (finished trials are kept)",
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides of the sweep file, e.g. num_samples=2"
    )
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser(
        "plot", help="figures: distances, t-SNE, ranked galleries, Grad-CAM; or compare CMC curves"
    )
    _config_args(p)
    p.add_argument("--checkpoint")
    p.add_argument("--untrained", action="store_true")
    p.add_argument("--trial", type=int, default=0)
    p.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        help="run directories whose metrics.json CMC curves to overlay",
    )
    p.add_argument("--setting", help="with --compare: only this setting (e.g. all)")
    p.add_argument("--out", type=Path, default=Path("runs/figures"))
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("report", help="markdown + HTML report of a finished run directory")
    p.add_argument("run", type=Path)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "export",
        help="ONNX export (dynamic batch, one graph per modality) + onnxruntime parity check",
    )
    _config_args(p)
    p.add_argument("--checkpoint")
    p.add_argument("--untrained", action="store_true")
    p.add_argument("--out", type=Path, default=Path("runs/export"))
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("config", help="print the fully resolved config")
    _config_args(p)
    p.add_argument(
        "--lr-schedule",
        action="store_true",
        help="print instead a JSON list of train.epochs values: the base lr (train.lr, a group "
        "with lr multiplier 1) in force during each epoch, epoch 0 first; every schedule "
        "changes the lr once per epoch, so it holds for all of that epoch's steps",
    )
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "weights",
        help="fetch ImageNet weights into the Hugging Face cache (login node) and print where",
    )
    actions = p.add_subparsers(dest="action", required=True)
    fetch = actions.add_parser(
        "fetch", help="download the weights model.pretrained: imagenet resolves to; print the file"
    )
    _config_args(fetch)
    fetch.add_argument("--backbone", help="a backbone name instead of -c CONFIG, e.g. resnet50")
    fetch.set_defaults(func=_cmd_weights)

    p = sub.add_parser("bench", help="benchmarks (JSON + markdown table)")
    p.add_argument(
        "suite",
        choices=("eval", "kernels", "loader", "methods", "train", "scaling", "accuracy", "gpu"),
    )
    p.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        help="arguments of the suite (see 'dist-reid bench eval -h')",
    )
    p.set_defaults(func=_cmd_bench)
    return parser


# Under a launcher every rank usually meets the same error (a config typo, a bad checkpoint):
# the other ranks wait this long for rank 0 to say it and for the launcher to stop them, and
# speak only if still running then (an error of their own, e.g. a NaN on that rank only).
RANK_ZERO_GRACE_S = 10.0


def _defer_to_rank_zero(seconds: float = RANK_ZERO_GRACE_S) -> None:
    import signal
    import time

    try:  # the training loop's preemption handler only sets a flag; we are leaving anyway
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
    except ValueError:  # not the main thread
        pass
    time.sleep(seconds)


def _legacy_train_resume(argv: list[str]) -> list[str]:
    """``train --resume PATH`` (the old form) -> ``--resume-from PATH``, with a note."""
    command = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    if command is None or argv[command] != "train":
        return argv
    from dist_reid.engine.run import legacy_resume_args, rank_zero

    tokens, note = legacy_resume_args(argv[command + 1 :])
    if note and rank_zero():
        print(f"dist-reid train: warning: {note}", file=sys.stderr)
    return [*argv[: command + 1], *tokens]


def main(argv: Sequence[str] | None = None) -> int:
    argv = _legacy_train_resume(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes one run of positionals: overrides after a flag (`a=1 --resume b=2`)
        # come back as extras, in order; anything else is argparse's own error
        if isinstance(getattr(args, "overrides", None), list) and not any(
            token.startswith("-") for token in extra
        ):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.parse_args(argv)
    from dist_reid.engine.run_log import configure_logging, launcher_rank

    configure_logging(launcher_rank(), verbose=args.verbose)  # INFO from rank 0 only
    if args.command != "weights":  # only 'weights fetch' may download; the rest read the cache
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return args.func(args)
    except SystemExit as exc:
        from dist_reid.engine.preemption import PREEMPTED_EXIT_CODE

        if exc.code == PREEMPTED_EXIT_CODE:
            # Checkpointed and leaving with 75: a late stop signal (the launcher's forward, srun
            # ending the step when another node left first) must not turn the exit into a kill.
            import signal

            try:
                for sig in (signal.SIGTERM, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_IGN)
            except ValueError:  # not the main thread
                pass
        raise
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        from dist_reid.engine.run import rank_zero

        where = ""
        if not rank_zero():
            _defer_to_rank_zero()
            where = f" (rank {os.environ.get('RANK') or os.environ.get('SLURM_PROCID')})"
        print(f"dist-reid {args.command}: error{where}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
