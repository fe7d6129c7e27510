"""Generate text from a CALM or AR run; `calm-sample` is the same command.

  python sample.py --config runs/calm/config.yaml --prompt "Once upon a time" --temperature 0.5
"""

import sys

from calm.cli import sample

if __name__ == "__main__":
  sys.exit(sample())
