"""`calm-plan`: compile a training step without running it and report memory per chip.

  calm-plan --config configs/calm_m.yaml stage=calm --topology v5e:2x2
  calm-plan --config configs/tiny.yaml --devices 8

See `calm.plan` for what is measured. The compiled step goes into the compilation cache
(`calm.compile_cache`): run without --topology on every host of a pod at once, it compiles the
step the trainer will run there, so that `calm-train` loads it instead of compiling.
"""

from __future__ import annotations

import argparse
import math
from typing import Sequence

from calm.errors import CalmError, ConfigError
from calm.plan import check_devices, devices_for, plan, report, verdict


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", help="YAML config file (defaults if omitted)")
  ap.add_argument("--topology", help="TPU slice to compile for, e.g. v5e:2x2 or v5p:2x2x1")
  ap.add_argument("--devices", type=int, help="use the first N devices")
  ap.add_argument("--hbm-gib", type=float, help="memory per chip to plan against")
  ap.add_argument("--no-baseline", action="store_true",
                  help="skip the compile without remat (no FLOPs ratio)")
  ap.add_argument("overrides", nargs="*", metavar="key=value")
  args = ap.parse_args(argv)
  if args.devices is not None and args.devices < 1:
    raise ConfigError(f"--devices: must be >= 1, got {args.devices}")
  if args.hbm_gib is not None and not (math.isfinite(args.hbm_gib) and args.hbm_gib > 0):
    raise ConfigError(f"--hbm-gib: must be a positive number of GiB, got {args.hbm_gib}")
  from calm import compile_cache, config
  cfg = config.load(args.config, args.overrides)
  compile_cache.enable(cfg)
  if args.devices:
    check_devices(cfg, args.devices)
  import jax
  if args.topology:
    jax.config.update("jax_platforms", "cpu")  # compile for the slice; nothing runs
  elif args.devices:
    try:  # fake devices on a CPU host; too late once a backend is up (then use what exists)
      jax.config.update("jax_num_cpu_devices", args.devices)
    except RuntimeError:
      pass
  else:  # on every host of a pod at once: the job's devices, the step the trainer compiles
    from calm import distributed
    distributed.maybe_initialize(cfg.distributed, verbose=False)
  devices = devices_for(args.topology, args.devices)
  p = plan(cfg, devices, hbm_gib=args.hbm_gib, baseline=not args.no_baseline)
  if jax.process_index() == 0:
    print(report(cfg, p, with_verdict=p.fits))
  if not p.fits:
    raise CalmError(verdict(p).split(None, 1)[1])
  return 0
