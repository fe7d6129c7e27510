"""What the study scripts share: run a project command from the repository root, and tell a
finished run (it evaluated its last step) from one to (re)start."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calm import metrics  # noqa: E402


def run(cmd: list[str]) -> None:
  """`python CMD...` from the repository root; a failure stops the study."""
  print("$", " ".join(cmd), flush=True)
  subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def finished(run_dir: pathlib.Path, steps: int) -> bool:
  """A run that already evaluated its last step (training would only resume and stop)."""
  return any(r["step"] == steps and any(k.startswith("eval/") for k in r)
             for r in metrics.read_jsonl(run_dir / "metrics.jsonl"))
