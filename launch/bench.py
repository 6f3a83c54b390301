"""Benchmarks: ``python launch/bench.py eval [--num-query ...]``."""

import sys

from dist_reid.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
