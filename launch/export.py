"""ONNX export: ``python launch/export.py -c CONFIG --checkpoint W --out DIR``."""

import sys

from dist_reid.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
