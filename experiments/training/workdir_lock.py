"""One training run per workdir at a time: an exclusive lock on `<workdir>/run.lock`.

The lock is a `filelock.FileLock`, on Unix an advisory `flock` lock, so the operating system
releases it when the holding process ends in any way (including `kill -9`): a crashed run never
leaves a stale lock behind. The file itself stays and names the last holder (pid, host, start
time), which the error message of a refused run quotes. filelock also refuses a `run.lock` that
is a symbolic link (OSError) instead of writing through it.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import datetime
import os
import socket

import filelock

LOCK_FILE = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another live process is training in this workdir."""


def _write_holder(descriptor: int) -> None:
  """Replaces the lock file's contents with this process's record (filelock's `on_acquired`)."""
  started = datetime.datetime.now().isoformat(timespec="seconds")
  record = f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n"
  os.ftruncate(descriptor, 0)
  os.pwrite(descriptor, record.encode(), 0)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock for the body; raises WorkdirLockedError if another process does."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  # preserve_lock_file keeps the holder's record after release and rules out filelock's soft
  # (marker file) fallback on filesystems without flock, whose marker a killed run would leave.
  lock = filelock.FileLock(path, timeout=0, preserve_lock_file=True, on_acquired=_write_holder)
  try:
    lock.acquire()
  except filelock.Timeout:
    with open(path) as file:
      holder = file.read().strip() or "unknown"
    raise WorkdirLockedError(
      f"{workdir} is in use by another training run ({holder}); wait for it to finish, "
      "stop it, or use another --workdir. (The lock is released as soon as that process "
      "ends, however it ends.)"
    ) from None
  try:
    yield
  finally:
    lock.release()
