"""Run under ``torchrun``: DeepSpeed backend checks in one launch (launches cost ~20 s each).

1. ``steps`` loop steps from a fresh trainer: this rank's losses and weights;
2. exact resume: ``fit`` to ``2*half`` steps straight, and ``fit`` to ``half`` then a new
   trainer resumed from ``last.pt`` to ``2*half``: both final weights.

Used by test_deepspeed.py (no test_ prefix, so not collected).
"""

import sys

import torch

from dist_reid.config import load_config
from dist_reid.engine.build import build_trainer
from dist_reid.engine.trainer import Trainer

config, out_dir, steps, half, *overrides = sys.argv[1:]


def flat(trainer: Trainer) -> torch.Tensor:
    module = trainer.backend.unwrap(trainer.model)
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


trainer = build_trainer(load_config(config, [*overrides, "run.name=loop"]))
trainer.pipeline.set_epoch(0)
losses = []
for batch in trainer.pipeline.iterate(0):
    losses.append(trainer.train_step(batch)["total"])
    if len(losses) == int(steps):
        break
module = trainer.backend.unwrap(trainer.model)
dtypes = sorted({str(p.dtype) for p in module.parameters()})
params = flat(trainer)

n = int(half)
straight = build_trainer(
    load_config(config, [*overrides, "run.name=straight", f"train.max_steps={2 * n}"])
)
straight.fit()
first = build_trainer(load_config(config, [*overrides, "run.name=split", f"train.max_steps={n}"]))
first.fit()
second = build_trainer(
    load_config(config, [*overrides, "run.name=split", f"train.max_steps={2 * n}"])
)
second.fit(resume=second.run_dir / "last.pt")

torch.save(
    {
        "losses": losses,
        "params": params,
        "dtypes": dtypes,
        "world": trainer.backend.world_size,
        "backend": trainer.backend.name,
        "straight": flat(straight),
        "resumed": flat(second),
        "resumed_step": second.global_step,
        "after_first": flat(first),
    },
    f"{out_dir}/rank{trainer.backend.rank}.pt",
)
