"""Runs a group of processes (e.g. the hosts of a jax.distributed run) with a hard time bound."""

import socket
import subprocess
import tempfile
import time


def free_port() -> int:
  """A TCP port on loopback that is free right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_group(commands, env, bound, kill_last_after=None):
  """Starts `commands`; returns `(returncodes, output of the first, seconds)`.

  Output goes to files (pipes could fill up and block a chatty process). Processes still
  running after `bound` seconds are killed, so a hung peer fails the caller, never hangs it.
  """
  logs = [tempfile.TemporaryFile("w+") for _ in commands]
  procs = [
    subprocess.Popen(
      cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    for cmd, log in zip(commands, logs)
  ]
  start = time.time()
  try:
    if kill_last_after is not None:
      time.sleep(kill_last_after)
      procs[-1].kill()
    for p in procs:
      p.wait(timeout=max(1, bound - (time.time() - start)))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs[0].seek(0)
  return [p.returncode for p in procs], logs[0].read(), time.time() - start
