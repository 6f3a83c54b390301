"""One rank of the collective-timeout test (test_hangs.py; not collected: no test_ prefix).

``python timeout_probe.py BACKEND OUT_JSON`` with RANK/WORLD_SIZE/MASTER_* set: the backend is
built with a 2 s collective timeout and a 20 s set-up timeout, then three phases, each timed:
``first``: rank 1 arrives 5 s late at the first collective (within the set-up timeout);
``rank0_works``: after ``end_setup``, rank 0 arrives 5 s late inside ``waiting_on_rank_zero``;
``later``: rank 1 arrives 6 s late at a collective after set-up (beyond the 2 s timeout).
"""

import json
import os
import sys
import time

import torch

from dist_reid.engine.backend_factory import create_backend
from dist_reid.engine.distributed import peer_failure

name, out = sys.argv[1:3]
options = {"deepspeed_config": {"train_micro_batch_size_per_gpu": 1}} if name == "deepspeed" else {}
backend = create_backend(name, timeout_s=2.0, init_timeout_s=20.0, **options)
result: dict = {"world": backend.world_size}


def phase(label: str, late_rank: int, delay: float) -> None:
    if backend.rank == late_rank:
        time.sleep(delay)
    start = time.monotonic()
    try:
        flag = torch.ones(1)
        torch.distributed.all_reduce(flag)
        result[label] = {"ok": True, "waited": time.monotonic() - start}
    except RuntimeError as exc:
        result[label] = {
            "ok": False,
            "waited": time.monotonic() - start,
            "line": peer_failure(exc, backend),
        }


phase("first", late_rank=1, delay=5.0)
backend.end_setup()
with backend.waiting_on_rank_zero():
    phase("rank0_works", late_rank=0, delay=5.0)
phase("later", late_rank=1, delay=6.0)
with open(out, "w") as f:
    json.dump(result, f)
# The group is broken on purpose (the last collective timed out): tearing it down at exit can
# abort in gloo's threads ("terminate called without an active exception"); skip it.
sys.stdout.flush()
os._exit(0)
