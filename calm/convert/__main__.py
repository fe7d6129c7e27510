"""`python -m calm.convert`."""

import sys

from calm.convert.command import main
from calm.errors import cli

sys.exit(cli(main)())
