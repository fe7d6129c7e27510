"""Train a calm-jax stage: autoencoder, calm or ar.

  calm-train --config configs/tiny.yaml stage=autoencoder run_dir=runs/ae
  calm-train --config configs/tiny.yaml stage=calm run_dir=runs/calm train.autoencoder=runs/ae

Any config key can be overridden as dotted key=value (see calm/config.py for the schema).
A run resumes from the latest checkpoint in its run_dir.
"""

import argparse

from calm import paths


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", help="YAML config file (defaults if omitted)")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="dotted overrides, e.g. model.backbone.num_layers=4 train.steps=100")
  args = parser.parse_args(argv)
  cfg = paths.load_config(args.config, args.overrides)
  if cfg.train.autoencoder:  # a wrong autoencoder path is refused before seconds of imports
    paths.autoencoder_dir(cfg)
  from calm import trainer  # heavy imports after the config is known to be valid
  result = trainer.train(cfg)
  last = result.history[-1] if result.history else {}
  print(f"{cfg.stage}: finished at step {result.step} in {result.run_dir}"
        + (f", loss {last['loss']:.4f}" if "loss" in last else ""))
  return 0
