"""Prints a CALM run's normalised energy score at its first and last evaluation.

  python scripts/calm_progress.py runs/demo/calm
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from calm import metrics  # noqa: E402

if __name__ == "__main__":
  if len(sys.argv) != 2:
    print(f"error: usage: {sys.argv[0]} RUN_DIR", file=sys.stderr)
    sys.exit(2)
  print(metrics.learning_summary(sys.argv[1]))
