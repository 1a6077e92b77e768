"""Tool entry points start quietly: library notices a user cannot act on are hidden, others not."""

import subprocess
import sys
import warnings
from pathlib import Path

from megatron.sparse.cli import quiet_library_notices

REPO = Path(__file__).resolve().parents[1]


def test_quiet_library_notices_hides_only_the_library_notices():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_notices()
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("Transformer Engine and Apex are not installed. Falling back", UserWarning)
        warnings.warn("full scope is deprecated. Use empty cuda_graph_scope", UserWarning)
        warnings.warn("calibration data is short", UserWarning)
    assert [str(w.message) for w in caught] == ["calibration data is short"]


def test_tool_importing_megatron_core_starts_without_notices():
    # train_mask imports megatron-core at module level, where it warns that TE/apex are missing.
    result = subprocess.run([sys.executable, str(REPO / "tools" / "train_mask.py"), "--help"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "--prior-strength" in result.stdout, result.stderr
    assert "not installed" not in result.stderr, result.stderr


def test_help_shows_field_docs_with_percent_signs():
    import argparse
    from dataclasses import dataclass

    from megatron.sparse.cli import add_dataclass_args

    @dataclass
    class Config:
        ratio: "float" = 0.5  # the tools' configs use postponed (string) annotations
        """Keep 50 % of the weights (100 % is dense)."""

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Config)
    assert "Keep 50 % of the weights (100 % is dense)." in " ".join(parser.format_help().split())
