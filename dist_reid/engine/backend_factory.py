"""``create_backend``: train.backend -> an Accelerate or DeepSpeed backend.

The one module that knows both backends; they share ``distributed.py`` and never import each
other. Importing ``deepspeed_backend`` is cheap: DeepSpeed itself (an extra) is imported only
when that backend is built.
"""

from __future__ import annotations

from typing import Any

from dist_reid.engine.backends import AccelerateBackend
from dist_reid.engine.deepspeed_backend import DeepSpeedBackend
from dist_reid.engine.distributed import TrainingBackend, isolate_elastic_restarts


def create_backend(name: str, **kwargs: Any) -> TrainingBackend:
    """``kwargs``: the options of either backend (``mixed_precision`` as train.mixed_precision,
    ``auto`` included); the other backend's options are dropped."""
    isolate_elastic_restarts()  # before any process group exists (torchrun restarts)
    if name == "deepspeed":
        return DeepSpeedBackend(config=kwargs.pop("deepspeed_config", None), **kwargs)
    if name == "accelerate":
        # DeepSpeed-only options; accelerate clips through the loop's clip() call instead.
        kwargs.pop("deepspeed_config", None)
        kwargs.pop("grad_clip", None)
        return AccelerateBackend(**kwargs)
    raise ValueError(f"train.backend: unknown backend {name!r}")
