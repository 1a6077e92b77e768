"""Run ``tools/*.py``: in a subprocess, as a user does, or in this process, for error cases.

A subprocess pays ~10 s of interpreter and megatron-core start-up; the user-error tests run the
same script in-process (same ``sys.argv`` parsing, same ``run_main`` wrapper: exit status 2 and
one ``error: ...`` line) and keep one subprocess case per tool for the real command line.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import torch.distributed as dist

TOOLS = Path(__file__).resolve().parents[1] / "tools"
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def run_tool(name: str, *args, nproc: int = 1, timeout: float = 600,
             **env_overrides: str) -> subprocess.CompletedProcess:
    """``python tools/<name>.py ARGS`` (under torchrun when ``nproc > 1``), output captured;
    ``env_overrides`` are set in its environment."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [str(TOOLS / f"{name}.py"), *map(str, args)]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    if nproc > 1:  # ranks x threads <= cores: oversubscribed OpenMP spin-waits stall CI machines
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env |= env_overrides
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def run_tool_in_process(name: str, *args) -> subprocess.CompletedProcess:
    """Run ``tools/<name>.py`` as ``__main__`` in this process and capture what it prints.

    An exception the tool does not turn into a user error propagates (the test fails, as a
    traceback would). The process group a tool starts is gone afterwards, as at process exit.
    """
    if dist.is_initialized():
        raise RuntimeError("run_tool_in_process needs a process without a process group")
    script = str(TOOLS / f"{name}.py")
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_path, code = sys.argv, list(sys.path), 0
    sys.argv = [script, *map(str, args)]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if isinstance(exc.code, str):
            stderr.write(exc.code + "\n")
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        if dist.is_initialized():
            from megatron.sparse import parallel

            parallel.shutdown()
    return subprocess.CompletedProcess([script, *map(str, args)], code, stdout.getvalue(),
                                       stderr.getvalue())
