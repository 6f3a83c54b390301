import sys

from dist_reid.cli import main

sys.exit(main())
