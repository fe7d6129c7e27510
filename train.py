"""Train a calm-jax stage (autoencoder, calm or ar); `calm-train` is the same command.

  python train.py --config configs/tiny.yaml stage=autoencoder run_dir=runs/ae
"""

import sys

from calm.cli import train

if __name__ == "__main__":
  sys.exit(train())
