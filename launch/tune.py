"""Sweep: ``python launch/tune.py --config configs/tune/icre_lambda_rho.yaml [--resume]``."""

import sys

from dist_reid.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
