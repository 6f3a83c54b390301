"""reid_kernels: fused kernels for pairwise distances and metric/center losses.

Each op lives in one file with its Triton kernel, autograd Function, torch reference and
dispatcher (architecture decision 6):

* :mod:`.pairwise`: :func:`pairwise_distance`, :func:`topk_distances` (streaming query x
  gallery top-k for evaluation);
* :mod:`.triplet`: :func:`triplet_mining_loss` (batch-hard and AGW's weighted regularisation);
* :mod:`.center`: :func:`center_losses` (hetero-center triplet, cross-modal center pull,
  learnable centers; without host syncs for a :class:`BatchLayout` batch) and
  :func:`segment_mean`;
* :mod:`.dispatch`: ``backend="auto" | "triton" | "torch"`` selection.

Every op takes ``backend``: ``"auto"`` runs Triton on CUDA tensors and the torch reference on
CPU; ``"triton"`` on CPU tensors runs the same kernels under the Triton interpreter (set
``TRITON_INTERPRET=1`` before importing this package); ``"torch"`` is the reference, which the
tests treat as ground truth. triton is optional: without it ``"auto"`` uses torch. Loss math is
fp32 (bf16/fp16 inputs are upcast after loading); outputs are fp32.
"""

from .center import (
    BatchLayout,
    CenterLosses,
    batch_identities,
    center_losses,
    center_losses_reference,
    check_layout,
    learnable_center_loss_reference,
    segment_mean,
    segment_mean_reference,
)
from .dispatch import BACKENDS, HAS_TRITON, INTERPRET, resolve_backend
from .pairwise import pairwise_distance, pairwise_distance_reference, topk_distances
from .triplet import WRT_FORMS, triplet_mining_loss, triplet_mining_loss_reference

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "INTERPRET",
    "WRT_FORMS",
    "BatchLayout",
    "CenterLosses",
    "batch_identities",
    "center_losses",
    "center_losses_reference",
    "check_layout",
    "learnable_center_loss_reference",
    "pairwise_distance",
    "pairwise_distance_reference",
    "resolve_backend",
    "segment_mean",
    "segment_mean_reference",
    "topk_distances",
    "triplet_mining_loss",
    "triplet_mining_loss_reference",
]
