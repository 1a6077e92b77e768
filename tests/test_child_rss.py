"""The benchmarks' child peak-RSS measurement: the child's own peak, whatever the parent holds."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from child_rss import run_measured  # noqa: E402

MIB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork/exec RSS accounting")
def test_peak_rss_is_the_childs_own_not_the_parents():
    held = bytearray(400 * MIB)  # touched: 400 MiB resident in this process
    held[::4096] = b"\1" * len(held[::4096])
    small = run_measured([sys.executable, "-S", "-c", "pass"], capture=True)
    big = run_measured([sys.executable, "-S", "-c",
                        "b = bytearray(300 * 2**20); b[::4096] = b'\\1' * len(b[::4096])"],
                       capture=True)
    del held
    assert small["returncode"] == big["returncode"] == 0, (small, big)
    # a bare interpreter is ~10 MiB; inherited, the figure would be >= 400 MiB
    assert small["peak_rss_bytes"] < 100 * MIB, small
    assert 300 * MIB <= big["peak_rss_bytes"] < 400 * MIB, big
    assert small["seconds"] > 0 and big["cpu_seconds"] >= 0
    failed = run_measured([sys.executable, "-S", "-c", "raise SystemExit(3)"], capture=True)
    assert failed["returncode"] == 3
