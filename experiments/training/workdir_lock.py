"""One training run per workdir at a time: an exclusive lock on `<workdir>/run.lock`.

The lock is an advisory `fcntl.flock` lock, so the operating system releases it when the
holding process ends in any way (including `kill -9`): a crashed run never leaves a stale lock
behind. The file itself stays and names the last holder (pid, host, start time), which the
error message of a refused run quotes.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import datetime
import fcntl
import os
import socket

LOCK_FILE = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another live process is training in this workdir."""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock for the body; raises WorkdirLockedError if another process does."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  # Opened for appending so that a refused attempt does not truncate the holder's record.
  with open(path, "a+") as file:
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      file.seek(0)
      holder = file.read().strip() or "unknown"
      raise WorkdirLockedError(
        f"{workdir} is in use by another training run ({holder}); wait for it to finish, "
        "stop it, or use another --workdir. (The lock is released as soon as that process "
        "ends, however it ends.)"
      ) from None
    file.seek(0)
    file.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    file.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n")
    file.flush()
    try:
      yield
    finally:
      fcntl.flock(file, fcntl.LOCK_UN)
