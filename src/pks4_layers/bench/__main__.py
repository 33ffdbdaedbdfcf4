"""``python -m pks4_layers.bench``: the same as ``pks4-bench``."""

import sys

from .scan_speed import main

sys.exit(main())
