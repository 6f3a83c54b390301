"""The resolved config as plain values (stored in every checkpoint) and what a resume compares."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

# Keys a resume may change freely: none of them changes what a training step computes.
# * run.name, run.output_dir: where the run lives (a moved or renamed run folder).
#   run.seed is compared: the sampler's plan is a function of (seed, epoch).
# * data.root: where the same images live; data.num_workers: how many processes decode them.
# * train.log_every, train.eval_every, train.checkpoint_every_steps, train.tensorboard,
#   train.trackers, train.progress_bar: the logging, evaluation and checkpoint cadence and
#   where the logs go.
# * train.max_steps: a cap on this invocation's steps, raised to continue a capped run.
# * train.dist_timeout_s, train.dist_init_timeout_s, train.preempt_grace_s: how long to wait
#   for a peer or for the preemption checkpoint.
# * train.mixed_precision: the compute precision of this invocation's hardware and launcher
#   (``auto`` resolves per launch, so the key does not record it anyway); the saved state is
#   fp32 under Accelerate's autocast, and DeepSpeed's precision is fixed by train.deepspeed_config,
#   which is compared. Runs from before ``auto`` (saved as "no") resume under the new default.
# * eval.*: what an evaluation reports, never what is trained.
RESUME_NEUTRAL_KEYS = (
    "run.name",
    "run.output_dir",
    "data.root",
    "data.num_workers",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every_steps",
    "train.tensorboard",
    "train.trackers",
    "train.progress_bar",
    "train.max_steps",
    "train.dist_timeout_s",
    "train.dist_init_timeout_s",
    "train.preempt_grace_s",
    "train.mixed_precision",
)
RESUME_NEUTRAL_PREFIXES = ("eval.",)
# Free-form mappings: a key present on one side only is a change (in the schema's own sections a
# key missing from an older checkpoint's config is a key added since, left at its default).
FREE_MAPPINGS = ("model.options.", "loss.options.", "optim.lr_mults.")
UNSET = "<unset>"


def plain_config(cfg: Any) -> dict[str, Any]:
    """``cfg`` as nested dicts, lists and scalars: loadable with ``weights_only=True``."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, tuple):
        tree = list(tree)
    return {prefix[:-1]: tree}


def _neutral(key: str) -> bool:
    return key in RESUME_NEUTRAL_KEYS or key.startswith(RESUME_NEUTRAL_PREFIXES)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every key that changes what is trained, in
    the order of ``new`` (keys only ``old`` has last); values a side lacks are ``UNSET``."""
    before, after = _flatten(old), _flatten(new)
    changes = []
    for key in [*after, *(k for k in before if k not in after)]:
        if _neutral(key):
            continue
        if key not in before or key not in after:
            if key.startswith(FREE_MAPPINGS):
                changes.append((key, before.get(key, UNSET), after.get(key, UNSET)))
            continue
        if before[key] != after[key]:
            changes.append((key, before[key], after[key]))
    return changes


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """``train.lr 0.001 -> 0.5, optim.name 'sgd' -> 'adamw'``."""
    return ", ".join(
        f"{key} {old if old == UNSET else repr(old)} -> {new if new == UNSET else repr(new)}"
        for key, old, new in changes
    )
