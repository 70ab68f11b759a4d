"""One run per workdir, and clean program output after an error (subprocesses)."""

import glob
import os
import signal
import subprocess
import sys

import pytest

from experiments.toy.configs import default as toy_default
from experiments.training import loop
from experiments.training import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": ROOT}
HOLD_LOCK = """
import sys, time
from experiments.training import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print("holding", flush=True)
  time.sleep(600)
"""
TOY_OVERRIDES = {
  "num_layers": 2,
  "num_train": 200,
  "num_validation": 100,
  "num_test": 100,
  "num_epochs": 2,
  "warmup_steps": 0,
}

# A background callback that outlives a run (see test_mnist.py) fails the test it surfaces in.
pytestmark = [
  pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
  pytest.mark.filterwarnings("error:coroutine .* was never awaited:RuntimeWarning"),
]


def test_a_second_run_is_refused_while_the_first_holds_the_workdir(tmp_path):
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "holding"
    config = toy_default.get_config()
    config.update(TOY_OVERRIDES)
    message = rf"in use by another training run \(pid {holder.pid} on host "
    with pytest.raises(workdir_lock.WorkdirLockedError, match=message):
      loop.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")  # Refused before touching anything.
  finally:
    holder.send_signal(signal.SIGKILL)  # As a crash would: no clean-up in the holder.
    holder.wait()
  with workdir_lock.hold(str(tmp_path)):  # The killed holder's lock is gone with it.
    assert f"pid {os.getpid()} on host" in (tmp_path / workdir_lock.LOCK_FILE).read_text()


def test_a_lock_file_that_is_a_symbolic_link_is_refused_not_written_through(tmp_path):
  """A `run.lock` symlink (planted, or copied along with a workdir) must not let the run
  truncate and overwrite the file it points to."""
  precious = tmp_path / "precious.txt"
  precious.write_text("not a lock\n")
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  (workdir / workdir_lock.LOCK_FILE).symlink_to(precious)
  with pytest.raises(OSError, match="symbolic link"), workdir_lock.hold(str(workdir)):
    pass
  assert precious.read_text() == "not a lock\n"


def test_unreadable_checkpoints_end_the_program_with_one_clean_error(tmp_path):
  """No asyncio or shutdown noise ("Event loop is closed", "sys.meta_path is None", "exception
  was never retrieved") after the error: only the error itself."""
  config = toy_default.get_config()
  config.update(TOY_OVERRIDES)
  loop.train_and_evaluate(config, str(tmp_path))
  for path in glob.glob(
    str(tmp_path / "checkpoints" / "latest" / "*" / "default" / "**" / "d" / "*"), recursive=True
  ):
    with open(path, "r+b") as file:
      file.seek(os.path.getsize(path) // 2)
      file.write(b"\xff" * 8)
  overrides = [
    f"--config.{key}={value}" for key, value in {**TOY_OVERRIDES, "num_epochs": 3}.items()
  ]
  result = subprocess.run(
    [sys.executable, "-m", "experiments.toy", f"--workdir={tmp_path}", *overrides],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode != 0
  assert "ValueError: None of the checkpoints" in result.stderr
  for noise in (
    "Event loop is closed",
    "sys.meta_path is None",
    "exception was never retrieved",
    "could not be restored",
  ):
    assert noise not in result.stderr, noise
