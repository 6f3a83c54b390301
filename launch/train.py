"""Train: ``accelerate launch --multi_gpu --num_processes N launch/train.py -c CONFIG [overrides]``
(or ``torchrun --nproc_per_node N launch/train.py ...``, or plain ``python`` for one process)."""

import sys

from dist_reid.engine.run import train_main

if __name__ == "__main__":
    sys.exit(train_main())
