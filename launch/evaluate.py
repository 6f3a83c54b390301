"""Run a dataset's test protocol: ``python launch/evaluate.py -c CONFIG --checkpoint W [overrides]``."""

import sys

from dist_reid.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
