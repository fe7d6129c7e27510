"""Reading weight files: safetensors (sharded, bf16), npz and PyTorch `.bin` → numpy arrays."""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Callable

import numpy as np

from calm.errors import CalmError, CheckpointError


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """safetensors via its numpy API; BF16 tensors (no numpy dtype) are widened to float32."""
  from safetensors import safe_open

  with open(path, "rb") as fh:
    (n,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(n))
  header.pop("__metadata__", None)
  bf16 = {k for k, v in header.items() if v.get("dtype") == "BF16"}
  out: dict[str, np.ndarray] = {}
  with safe_open(str(path), framework="np") as f:
    for k in f.keys():
      if k not in bf16:
        out[k] = f.get_tensor(k)
  if bf16:
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for k in bf16:
      start, end = header[k]["data_offsets"]
      u16 = np.frombuffer(raw[start:end], dtype="<u2").astype(np.uint32) << 16
      out[k] = u16.view(np.float32).reshape(header[k]["shape"])
  return out


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise CalmError(f"{path}: reading pytorch_model.bin needs PyTorch (pip install torch, "
                    f"next to pip install 'calm-jax[convert]'), or save the weights as "
                    f"model.safetensors") from None
  state = torch.load(str(path), map_location="cpu", weights_only=True)
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()
          if hasattr(v, "detach") and v.is_floating_point()}


_READERS: dict[str, Callable[[pathlib.Path], dict[str, np.ndarray]]] = {
    ".safetensors": _read_safetensors, ".npz": _read_npz, ".bin": _read_torch, ".pt": _read_torch,
    ".pth": _read_torch}


def _weight_files(src: pathlib.Path) -> list[pathlib.Path]:
  for name in ("model.safetensors", "pytorch_model.bin"):
    if (src / name).is_file():
      return [src / name]
    index = src / f"{name}.index.json"
    if index.is_file():
      try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
      return [src / s for s in shards]
  found = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.npz"))
  if found:
    return found
  raise CheckpointError(f"{src}: no weights found (model.safetensors, *.npz or pytorch_model.bin)")


def read_weights(src: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory (or one weights file), by state_dict name."""
  src = pathlib.Path(src)
  if not src.exists():
    raise CheckpointError(f"checkpoint directory not found: {src}")
  files = [src] if src.is_file() else _weight_files(src)
  out: dict[str, np.ndarray] = {}
  for f in files:
    reader = _READERS.get(f.suffix)
    if reader is None:
      raise CheckpointError(f"{f}: unsupported weights format (use .safetensors, .npz or .bin)")
    if not f.is_file():
      raise CheckpointError(f"{f}: weights file not found")
    try:
      out.update(reader(f))
    except CalmError:
      raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a damaged file
      msg = " ".join(str(e).split())[:200]
      raise CheckpointError(f"{f}: unreadable weights ({type(e).__name__}: {msg})") from None
  return out
