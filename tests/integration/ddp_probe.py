"""Run under ``accelerate launch``: a few engine steps, then dump this rank's losses and weights.

Used by test_training.py (not collected by pytest: no test_ prefix).
"""

import sys

import torch

from dist_reid.config import load_config
from dist_reid.engine.build import build_trainer

config, out_dir, steps, *overrides = sys.argv[1:]
# Random init unless a test overrides it: CI has no network and no ImageNet weights.
trainer = build_trainer(load_config(config, ["model.pretrained=null", *overrides]))
trainer.pipeline.set_epoch(0)
losses = []
for batch in trainer.pipeline.iterate(0):
    losses.append(trainer.train_step(batch)["total"])
    if len(losses) == int(steps):
        break
params = torch.cat(
    [p.detach().flatten() for p in trainer.backend.unwrap(trainer.model).parameters()]
)
torch.save(
    {
        "losses": losses,
        "params": params,
        "world": trainer.backend.world_size,
        "batch": len(batch["labels"]),
    },
    f"{out_dir}/rank{trainer.backend.rank}.pt",
)
