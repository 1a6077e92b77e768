""".bin/.idx validation: every damaged or missing file is one line naming the file and the fix.

The corruptions are written against megatron-core's MMIDIDX layout independently of the
validator: header (9-byte magic, u64 version, u8 dtype code, u64 sequence count, u64 document
count), then int32 sizes, int64 byte pointers and int64 document offsets.
"""

import struct

import pytest

from megatron.sparse.data.indexed import CorruptDataError, read_token_windows, write_indexed
from megatron.sparse.prune.data import calibration_windows
from megatron.sparse.train.data import count_tokens
from tests.tools import run_tool, run_tool_in_process
from tests.train_fixtures import tiny_checkpoint

HEADER = 9 + 8 + 1 + 8 + 8
DOCS = ["alpha beta", "a second document", "three"]


def _write(prefix: str) -> None:
    write_indexed(prefix, DOCS, encode=lambda t: [b + 1 for b in t.encode()], eod=0,
                  vocab_size=257, log_every=0)


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path: str, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - nbytes)


def _doc_offsets_at(prefix: str) -> int:
    with open(prefix + ".idx", "rb") as f:
        head = f.read(HEADER)
    sequences = struct.unpack("<Q", head[18:26])[0]
    return HEADER + sequences * (4 + 8)


CORRUPTIONS = {
    "truncated_idx": (lambda p: _truncate(p + ".idx", 5), r"\.idx.*(bytes|length)"),
    "extra_idx_bytes": (lambda p: open(p + ".idx", "ab").write(b"\0" * 5), r"\.idx.*bytes"),
    "bad_magic": (lambda p: _patch(p + ".idx", 0, b"NOTANIDX\0"), r"\.idx.*not a megatron"),
    "bad_version": (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 7)), r"\.idx.*version 7"),
    "bad_dtype_code": (lambda p: _patch(p + ".idx", 17, b"\x63"), r"\.idx.*dtype code 99"),
    "float_dtype_code": (lambda p: _patch(p + ".idx", 17, b"\x07"), r"\.idx.*dtype code 7"),
    "huge_sequence_count": (lambda p: _patch(p + ".idx", 18, struct.pack("<Q", 2**40)),
                            r"\.idx.*(bytes|length)"),
    "truncated_header": (lambda p: open(p + ".idx", "wb").write(b"MMIDIDX\0\0\1"),
                         r"\.idx.*header"),
    "truncated_bin": (lambda p: _truncate(p + ".bin", 4), r"\.bin"),
    "non_monotone_documents": (
        lambda p: _patch(p + ".idx", _doc_offsets_at(p) + 8, struct.pack("<q", 3)),
        r"\.idx.*document offsets"),
    "documents_end_early": (
        lambda p: _patch(p + ".idx", _doc_offsets_at(p) + 3 * 8, struct.pack("<q", 2)),
        r"\.idx.*document offsets"),
    "negative_size": (lambda p: _patch(p + ".idx", HEADER, struct.pack("<i", -1)),
                      r"\.idx.*size"),
}


def test_valid_files_pass_and_read_back(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix)
    assert count_tokens(prefix) == sum(len(d) + 1 for d in DOCS)
    assert read_token_windows(prefix, 4).shape == (sum(len(d) + 1 for d in DOCS) // 4, 4)


def test_calibration_offset_reads_the_next_disjoint_windows(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix)
    stream = [t for d in DOCS for t in [b + 1 for b in d.encode()] + [0]]
    second = calibration_windows(prefix, tokenizer_spec=None, seq_length=4, num_samples=2,
                                 offset=3)
    assert second.tolist() == [stream[12:16], stream[16:20]]
    with pytest.raises(ValueError, match="after offset 7"):
        calibration_windows(prefix, tokenizer_spec=None, seq_length=4, num_samples=2, offset=7)
    with pytest.raises(ValueError, match="--calib-offset must be >= 0"):
        calibration_windows(prefix, tokenizer_spec=None, seq_length=4, num_samples=1, offset=-1)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_files_are_one_line_errors(tmp_path, case):
    prefix = str(tmp_path / "d")
    _write(prefix)
    corrupt, match = CORRUPTIONS[case]
    corrupt(prefix)
    readers = [lambda: read_token_windows(prefix, 4), lambda: count_tokens(prefix),
               lambda: calibration_windows(prefix, tokenizer_spec=None, seq_length=4,
                                           num_samples=1)]
    for read in readers:
        with pytest.raises(CorruptDataError, match=match) as info:
            read()
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert "\n" not in message and prefix in message
        assert "tools/preprocess_data.py" in message, message


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_missing_file_is_one_line_error(tmp_path, suffix):
    prefix = str(tmp_path / "d")
    _write(prefix)
    (tmp_path / f"d{suffix}").unlink()
    for read in (lambda: read_token_windows(prefix, 4), lambda: count_tokens(prefix)):
        with pytest.raises(FileNotFoundError) as info:
            read()
        message = str(info.value)
        assert "\n" not in message and f"{prefix}{suffix}" in message
        assert "tools/preprocess_data.py" in message


def test_train_mask_on_a_corrupted_idx_exits_with_one_line(tmp_path):
    """The real command line: one ``error:`` line, status != 0, no traceback."""
    base = tiny_checkpoint(str(tmp_path / "base"))
    prefix = str(tmp_path / "tokens")
    write_indexed(prefix, [" ".join(["word"] * 60)] * 20,
                  encode=lambda t: [b % 250 + 1 for b in t.encode()], eod=0, vocab_size=256,
                  log_every=0)
    _truncate(prefix + ".idx", 8)
    result = run_tool("train_mask", "--load", base, "--data", prefix, "--save",
                      tmp_path / "run", "--seq-length", 16, "--micro-batch-size", 2,
                      "--global-batch-size", 4, "--train-iters", 1, timeout=300,
                      OMP_NUM_THREADS="1")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and prefix + ".idx" in errors[0], result.stderr[-3000:]
    assert "tools/preprocess_data.py" in errors[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_prune_oneshot_on_a_corrupted_calibration_bin_exits_with_one_line(tmp_path):
    """``--calib-data PREFIX`` with a truncated ``.bin``, through the tool's own error wrapper."""
    base = tiny_checkpoint(str(tmp_path / "base"))
    prefix = str(tmp_path / "calib")
    _write(prefix)
    _truncate(prefix + ".bin", 2)
    result = run_tool_in_process("prune_oneshot", "--load", base, "--method", "wanda",
                                 "--calib-data", prefix, "--calib-samples", 1, "--seq-length",
                                 4, "--save", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {prefix}.bin: "), result.stderr
    assert not (tmp_path / "out").exists()
