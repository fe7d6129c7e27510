"""The persistent compilation cache: every compiled program (training step, evaluation, sampling,
planning) is written to a directory and loaded instead of recompiled by any later launch with
the same program, jax/libtpu version, XLA flags and device topology.

Where, first that applies: $CALM_COMPILE_CACHE (a directory, or `off`); `compile_cache.enabled:
false` turns it off; `compile_cache.dir`; $JAX_COMPILATION_CACHE_DIR; $XDG_CACHE_HOME/calm-jax/jax
(~/.cache/calm-jax/jax). A `gs://` or other remote directory needs etils[epath] (installed).

Several processes may share one directory at once. Within a multi-host job only process 0
writes (jax's rule) and every host reads. Between jobs, a local directory is kept under
`compile_cache.max_gib` by dropping its least recently used programs, and every read and write
holds the directory's lock file (`.lockfile`), so a reader never sees a program half written
(without a size limit jax writes a program in place, unlocked). A remote directory has no lock
and no size limit: an object store shows an object whole or not at all. $JAX_COMPILATION_CACHE_DIR
is shared with other jax programs and used as they use it (no limit, no lock). Every entry point
calls `enable(cfg)` before its first compile. Light: no jax import until `enable` runs.

$CALM_COMPILE_CACHE_MIN_SECS overrides `compile_cache.min_compile_secs`. A local cache with a
size limit costs every *write* a scan of the whole directory (jax stats every program and reads
its last-use stamp to decide what to drop: ~0.1 s at 2,000 programs), so a process that
compiles thousands of tiny programs (a test suite) is better off not writing them.
"""

from __future__ import annotations

import os
import sys

from calm.config import CompileCacheConfig, Config
from calm.errors import ConfigError

ENV = "CALM_COMPILE_CACHE"
MIN_SECS_ENV = "CALM_COMPILE_CACHE_MIN_SECS"
_OFF = ("off", "0", "false", "no", "none")
_applied: tuple | None = None  # the settings this process runs with (None: never set)
# Programs loaded from / written to the cache by this process (jax's monitoring events).
counts = {"hits": 0, "writes": 0}
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
           "/jax/compilation_cache/cache_misses": "writes"}  # jax records a miss when it writes
_listening = False
_ENTRY, _STAMP = "-cache", "-atime"  # jax's file names: KEY-cache (the program), KEY-atime


def default_dir(environ=os.environ) -> str:
  """$XDG_CACHE_HOME/calm-jax/jax, or ~/.cache/calm-jax/jax."""
  home = environ.get("HOME", "").strip() or os.path.expanduser("~")
  base = environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(home, ".cache")
  return os.path.join(base, "calm-jax", "jax")


def _is_remote(path: str) -> bool:
  return "://" in path and not path.startswith("file://")


def _expand(path: str) -> str:
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def resolve(cc: CompileCacheConfig, environ=os.environ) -> tuple[str | None, str]:
  """(cache directory or None when off, where that choice came from)."""
  env = environ.get(ENV, "").strip()
  if env:
    return (None if env.lower() in _OFF else _expand(env)), f"${ENV}"
  if not cc.enabled:
    return None, "compile_cache.enabled"
  if cc.dir.strip():
    return _expand(cc.dir.strip()), "compile_cache.dir"
  jax_env = environ.get("JAX_COMPILATION_CACHE_DIR", "").strip()
  if jax_env:
    return _expand(jax_env), "$JAX_COMPILATION_CACHE_DIR"
  return default_dir(environ), "default"


def min_compile_secs(cc: CompileCacheConfig, environ=os.environ) -> float:
  """Programs compiled faster than this are not written: $CALM_COMPILE_CACHE_MIN_SECS, else
  `compile_cache.min_compile_secs`."""
  env = environ.get(MIN_SECS_ENV, "").strip()
  if not env:
    return float(cc.min_compile_secs)
  try:
    secs = float(env)
  except ValueError:
    secs = -1.0
  if not (secs >= 0 and secs != float("inf")):
    raise ConfigError(f"${MIN_SECS_ENV}: must be a number of seconds >= 0, got {env!r}")
  return secs


def _writable(path: str) -> str | None:
  """None when `path` is (or can be made) a writable directory, else why not."""
  if _is_remote(path):
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    return e.strerror or str(e)
  if not os.access(path, os.W_OK | os.X_OK):
    return "not writable"
  return None


def enable(cfg: Config | CompileCacheConfig | None = None) -> str | None:
  """Turns the persistent cache on (or off) for this process as `cfg` and the environment say;
  returns its directory (None: off). Call before the first compile; calling again with other
  settings switches the cache for later compiles. A directory given explicitly that cannot be
  written is a ConfigError; the default one is skipped with a warning."""
  global _applied
  cc = cfg.compile_cache if isinstance(cfg, Config) else (cfg or CompileCacheConfig())
  path, source = resolve(cc)
  if path is not None and (why := _writable(path)):
    if source != "default":
      key = "compile_cache.dir" if source.startswith("compile") else source
      raise ConfigError(f"{key}: cannot use {path} as the compilation cache ({why}); give "
                        f"another directory, or turn the cache off with {ENV}=off")
    print(f"warning: compilation cache off: cannot use {path} ({why}); set {ENV}=DIR",
          file=sys.stderr)
    path = None
  # A local cache with a size limit makes jax lock the directory around every read and write.
  # $JAX_COMPILATION_CACHE_DIR is shared with other jax programs, which write without the last-use
  # stamps the limit needs: used as they use it.
  shared = source == "$JAX_COMPILATION_CACHE_DIR"
  max_bytes = -1 if path is None or _is_remote(path) or shared else int(cc.max_gib * 2**30)
  if max_bytes > 0:
    _stamp_unstamped(path)
  settings = (path, min_compile_secs(cc), max_bytes)
  if settings == _applied:
    return path
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  _listen()
  jax.config.update("jax_enable_compilation_cache", path is not None)
  if path is not None:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", settings[1])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # any size
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
  compilation_cache.reset_cache()  # jax opens its cache once; the next compile reopens it
  _applied = settings
  return path


def _stamp_unstamped(path: str) -> None:
  """Gives every program in a local cache the last-use stamp jax's size limit reads: one written
  without a limit (by jax alone, or an older calm-jax) has none, and jax would fail every write
  to the directory while one is missing."""
  import filelock

  entries = {e.name for e in os.scandir(path)}
  missing = [n for n in entries if n.endswith(_ENTRY) and n[:-len(_ENTRY)] + _STAMP not in entries]
  if not missing:
    return
  with filelock.FileLock(os.path.join(path, ".lockfile"), timeout=30):
    for name in missing:
      entry = os.path.join(path, name)
      stamp = os.path.join(path, name[:-len(_ENTRY)] + _STAMP)
      try:
        mtime = os.stat(entry).st_mtime_ns
        if not os.path.exists(stamp):
          with open(stamp, "wb") as f:
            f.write(mtime.to_bytes(8, "little"))
      except FileNotFoundError:  # dropped meanwhile
        pass


def _listen() -> None:
  global _listening
  if not _listening:
    import jax

    def count(event: str, **_) -> None:
      if event in _EVENTS:
        counts[_EVENTS[event]] += 1

    jax.monitoring.register_event_listener(count)
    _listening = True


def directory() -> str | None:
  """The cache directory this process uses (None: off, or `enable` not called)."""
  return _applied[0] if _applied else None


def describe(path: str | None) -> str:
  """One line for logs: where compiled programs are cached."""
  return f"compilation cache {path}" if path else "compilation cache off"
