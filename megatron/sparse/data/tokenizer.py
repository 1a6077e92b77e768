"""Tokenizers behind one interface: the embedded model's, any HF tokenizer, sentencepiece."""

from __future__ import annotations

import json
from pathlib import Path

EMBEDDED = "embedded"


class SentencePieceTokenizer:
    """A sentencepiece ``.model`` with the small interface the tools use."""

    def __init__(self, path: str):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.eos_token_id = self.sp.eos_id()
        self.bos_token_id = self.sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def __len__(self) -> int:
        return self.sp.get_piece_size()


def load_tokenizer(spec: str):
    """``embedded``, a HF tokenizer directory or hub id, or a sentencepiece ``.model`` file.

    HF tokenizers are returned as is (``transformers`` objects); sentencepiece models as
    :class:`SentencePieceTokenizer`. Both have ``encode(text)``, ``eos_token_id`` and ``len()``.
    """
    if spec == EMBEDDED:
        from megatron.sparse.embedded import load_embedded_tokenizer

        return load_embedded_tokenizer()
    if spec.endswith(".model") and Path(spec).is_file():
        return SentencePieceTokenizer(spec)
    from transformers import AutoTokenizer

    try:  # tokenizers never run a directory's own code (a SLoRB export ships modeling code)
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=False,
                                             **_plain_config(spec))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load a tokenizer from {spec!r} (not 'embedded', a HF "
                                f"tokenizer directory/id or a sentencepiece .model): "
                                f"{str(exc).splitlines()[0]}") from None


def _plain_config(spec: str) -> dict:
    """``{"config": LlamaConfig()}`` for a SLoRB export (its ``slorb_llama`` config is custom
    code, and its tokenizer files name their class), else nothing."""
    path = Path(spec) / "config.json"
    if path.is_file() and json.loads(path.read_text()).get("model_type") == "slorb_llama":
        from transformers import LlamaConfig

        return {"config": LlamaConfig()}
    return {}


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (documents are joined with EOD instead)."""
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                         verbose=False)["input_ids"]
    return tokenizer.encode(text)


def eod_id(tokenizer) -> int:
    """The end-of-document id appended after every document."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or eos < 0:
        raise ValueError("the tokenizer has no EOS token to use as end-of-document")
    return int(eos)
