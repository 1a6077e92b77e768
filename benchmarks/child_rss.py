"""Wall time, CPU time and peak RSS of one child process, not inflated by its parent.

On Linux a process's peak RSS (``ru_maxrss``) starts at the RSS of the process it was forked
from: exec keeps the high-water mark of the address space it replaces. A benchmark that holds a
model and forks a tool would report at least its own size for the tool. The command therefore
runs as the grandchild of a lean wrapper (``python -S``, a few MiB): the wrapper forks it, and
its ``wait4`` figures are the command's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

_WRAPPER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    json.dump({"returncode": code, "cpu_seconds": usage.ru_utime + usage.ru_stime,
               "peak_rss_bytes": usage.ru_maxrss * 1024}, f)
sys.exit(0 if code == 0 else 1)
"""


def run_measured(cmd: list[str], *, stdout=None, stderr=None, env: dict | None = None,
                 capture: bool = False) -> dict:
    """Run ``cmd`` to completion; ``{returncode, seconds, cpu_seconds, peak_rss_bytes}``, plus
    ``output`` (stdout and stderr together) with ``capture``."""
    if capture:
        stdout, stderr = subprocess.PIPE, subprocess.STDOUT
    fd, report = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-S", "-c", _WRAPPER, report, *map(str, cmd)],
                              stdout=stdout, stderr=stderr, env=env, check=False, text=True)
        seconds = time.perf_counter() - start
        with open(report) as f:
            text = f.read()
        if not text:
            raise RuntimeError(f"the measuring wrapper of {cmd[0]} wrote no report")
        return {"seconds": seconds, **json.loads(text)} | (
            {"output": done.stdout} if capture else {})
    finally:
        os.unlink(report)
