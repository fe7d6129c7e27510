"""Headless Chromium driven over the DevTools protocol on a pipe (no driver, no websocket):
open a page, evaluate JavaScript until a condition holds, take a screenshot."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time


def find() -> str | None:
  return shutil.which("chromium") or shutil.which("chromium-browser") or \
      shutil.which("google-chrome")


class Browser:
  """`with Browser(profile_dir) as b: b.open(url); b.wait_for(js); b.screenshot()`."""

  def __init__(self, profile_dir: str, width: int = 900, height: int = 700):
    to_chrome_r, self._w = os.pipe()
    self._r, from_chrome_w = os.pipe()
    # the protocol's pipe is fd 3 (commands in) and fd 4 (replies out) of the browser
    cmd = [find(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--remote-debugging-pipe", f"--user-data-dir={profile_dir}",
           f"--window-size={width},{height}", "about:blank"]
    self._log = open(profile_dir + ".log", "wb")
    self.proc = subprocess.Popen(
        ["bash", "-c", f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', "chromium", *cmd],
        pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=self._log)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    self._id, self._buf, self.session = 0, b"", None

  def _send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
    self._id += 1
    msg = {"id": self._id, "method": method, "params": params or {}}
    if session and self.session:
      msg["sessionId"] = self.session
    os.write(self._w, json.dumps(msg).encode() + b"\0")
    while True:
      while b"\0" not in self._buf:
        chunk = os.read(self._r, 1 << 16)
        if not chunk:
          raise RuntimeError("chromium closed the protocol pipe")
        self._buf += chunk
      raw, self._buf = self._buf.split(b"\0", 1)
      reply = json.loads(raw)
      if reply.get("id") == self._id:
        if "error" in reply:
          raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

  def open(self, url: str) -> None:
    target = self._send("Target.createTarget", {"url": url}, session=False)["targetId"]
    self.session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True},
                              session=False)["sessionId"]

  def evaluate(self, expression: str):
    r = self._send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
    return r.get("result", {}).get("value")

  def wait_for(self, expression: str, timeout: float = 120.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      value = self.evaluate(expression)
      if value:
        return value
      time.sleep(every)
    raise TimeoutError(f"{expression} did not hold within {timeout:.0f} s")

  def screenshot(self) -> bytes:
    return base64.b64decode(self._send("Page.captureScreenshot", {"format": "png"})["data"])

  def close(self) -> None:
    try:
      self._send("Browser.close", session=False)
    except (RuntimeError, OSError):
      pass
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    os.close(self._w)
    os.close(self._r)
    self._log.close()

  def __enter__(self) -> Browser:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
