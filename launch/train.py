"""Train: ``accelerate launch --multi_gpu --num_processes N launch/train.py -c CONFIG [overrides]``
(or ``torchrun --nproc_per_node N launch/train.py ...``, or plain ``python`` for one process).

The same as ``dist-reid train``: a config or checkpoint error is one line (from rank 0) and exit
code 2; ``-v`` shows the full traceback."""

import sys

from dist_reid.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    verbose = [a for a in argv if a in ("-v", "--verbose")]
    sys.exit(main([*verbose, "train", *(a for a in argv if a not in verbose)]))
