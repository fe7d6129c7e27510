"""`python -m calm.convert`."""

import sys

from calm.cli import convert

sys.exit(convert())
