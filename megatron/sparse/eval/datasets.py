"""Evaluation text and token windows shared by the Megatron-side and HF-side perplexity.

Data specs: ``embedded`` (the held-out split of the embedded Wikipedia corpus, articles joined
with "\\n\\n"), ``python-stdlib`` (the held-out files of the standard-library source corpus,
megatron/sparse/data/sources.py, joined with "\\n\\n"), ``wikitext2`` (WikiText-2 raw test
split joined with "\\n\\n", through ``datasets``), or a path to a local UTF-8 text file.

Tokenization: the whole text is tokenized once with the tokenizer's default special tokens (for
LLaMA tokenizers that is a single BOS at the start of the stream, as in the SparseGPT/Wanda
WikiText-2 protocol; SmolLM2's tokenizer adds none) and then cut into non-overlapping windows of
``seq_length`` tokens; no BOS is inserted inside windows and the tail shorter than a window is
dropped. Each window predicts its tokens 1..L-1, so a window contributes L-1 tokens to the mean.
"""

from __future__ import annotations

from pathlib import Path

import torch

DATA_CHOICES = ("embedded", "python-stdlib", "wikitext2")


def eval_text(data: str) -> str:
    """The raw evaluation text of a data spec (see module docstring)."""
    if data == "embedded":
        from megatron.sparse.data.corpus import embedded_articles

        return "\n\n".join(_article_text(a) for a in embedded_articles("eval"))
    if data == "python-stdlib":
        from megatron.sparse.data.sources import STDLIB, file_documents

        return "\n\n".join(file_documents(STDLIB, "heldout"))
    if data == "wikitext2":
        return wikitext2_text()
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {data}: not 'embedded', 'wikitext2', 'python-stdlib' or an "
                                f"existing text file")
    return path.read_text(encoding="utf-8")


def _article_text(article) -> str:
    if isinstance(article, str):
        return article
    for name in ("text", "body"):
        if hasattr(article, name):
            return getattr(article, name)
        if isinstance(article, dict) and name in article:
            return article[name]
    raise TypeError(f"cannot read the text of a corpus article of type {type(article).__name__}")


def wikitext2_text() -> str:
    """WikiText-2 raw test split joined with "\\n\\n" (needs ``datasets`` and network/cache)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("--data wikitext2 needs the `datasets` package (pip install datasets); "
                         "or pass a local raw text file") from None
    try:
        split = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # network or hub errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--data wikitext2: could not load wikitext-2-raw-v1 through `datasets` "
                         f"({first}); check the network or HF_DATASETS_CACHE, or pass a local raw "
                         f"text file") from None
    return "\n\n".join(split["text"])


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of the whole text, tokenized once with the default special tokens."""
    if hasattr(tokenizer, "__call__") and hasattr(tokenizer, "convert_ids_to_tokens"):
        ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    elif hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
    else:
        raise TypeError(f"unsupported tokenizer type {type(tokenizer).__name__}")
    return torch.tensor(list(ids), dtype=torch.long)


def cut_windows(tokens: torch.Tensor, *, seq_length: int, max_windows: int | None = None,
                what: str = "evaluation data") -> torch.Tensor:
    """``[n, seq_length]`` non-overlapping windows of a 1-D token stream (tail dropped).

    With ``max_windows`` below the number of windows, that many windows are taken evenly spaced
    over the whole stream (window ``i * count // max_windows``), so a subset still covers every
    part of the text instead of only its first article.
    """
    if seq_length < 2:
        raise ValueError(f"--seq-length must be at least 2, got {seq_length}")
    count = tokens.numel() // seq_length
    if count == 0:
        raise ValueError(f"{what} has {tokens.numel()} tokens, fewer than one window of "
                         f"{seq_length}; use a shorter --seq-length or more text")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"--max-windows must be >= 1, got {max_windows}")
    windows = tokens[:count * seq_length].reshape(count, seq_length)
    if max_windows is not None and max_windows < count:
        windows = windows[torch.arange(max_windows) * count // max_windows]
    return windows.clone()


def eval_windows(data: str, tokenizer, *, seq_length: int,
                 max_windows: int | None = None) -> torch.Tensor:
    """Token windows of a data spec: the one stream both PPL implementations evaluate."""
    return cut_windows(tokenize_text(tokenizer, eval_text(data)), seq_length=seq_length,
                       max_windows=max_windows, what=f"--data {data}")
