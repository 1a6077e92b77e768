import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session", autouse=True)
def _cpu_shim():
    from megatron.sparse.compat import apply_cpu_shim

    apply_cpu_shim()
