"""Quiet starts: importing the package and building the training data print no library notices."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = """
import warnings
warnings.simplefilter("default")
import megatron.sparse.layers, megatron.sparse.train.data
from megatron.sparse import parallel
from megatron.sparse.train.data import TrainBatches
from tests.train_fixtures import write_tokens
write_tokens(sys.argv[1], docs=8, doc_len=40, vocab=256)
TrainBatches(prefix=sys.argv[1], seq_length=16, micro_batch_size=1, global_batch_size=2,
             train_iters=1, seed=1, vocab_size=256)
print("ok")
"""


def test_import_and_dataset_build_print_no_notices(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys\n" + _SCRIPT, str(tmp_path / "t")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr
    for notice in ("not installed", "pad token id"):
        assert notice not in done.stderr, done.stderr
