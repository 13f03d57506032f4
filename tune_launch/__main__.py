"""`python -m tune_launch ...` is `tune-launch ...`."""

import sys

from tune_launch.launch.cli import main

sys.exit(main())
