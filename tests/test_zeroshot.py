"""Zero-shot evaluation: local tasks, the Megatron lm-eval adapter against transformers, HFLM
agreement, TP agreement, bad inputs."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

from megatron.sparse import parallel
from megatron.sparse.eval.zeroshot import local_tasks, runner
from tests.hf_tiny import tiny_hf_model
from tests.tools import run_tool, run_tool_in_process

WORDS = ("river stone light garden window market silver morning letter valley castle forest "
         "engine harbor winter summer bridge mountain village station").split()


def _texts(seed: int, docs: int = 4, words: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(docs)]


def test_local_tasks_are_deterministic_and_well_formed(tmp_path):
    texts = _texts(0)
    names = local_tasks.build_local_tasks(texts, tmp_path / "a", prefix="toy", n_examples=12,
                                          seed=5)
    local_tasks.build_local_tasks(texts, tmp_path / "b", prefix="toy", n_examples=12, seed=5)
    assert names == ["toy_cloze", "toy_choice"]
    for name in names:
        a = (tmp_path / "a" / f"{name}.jsonl").read_text()
        assert a == (tmp_path / "b" / f"{name}.jsonl").read_text()
        assert local_tasks.validate_task_file(tmp_path / "a" / f"{name}.yaml") == name
    cloze = [json.loads(x) for x in (tmp_path / "a" / "toy_cloze.jsonl").read_text().split("\n")
             if x]
    choice = [json.loads(x) for x in
              (tmp_path / "a" / "toy_choice.jsonl").read_text().split("\n") if x]
    assert len(cloze) == len(choice) == 12
    for row in cloze:  # the target follows its context in the document and occurs in it
        assert f"{row['context']} {row['target']}" in texts[row["doc"]]
        assert row["target"] in row["context"].split()
        assert len(row["context"].split()) == local_tasks.CLOZE_CONTEXT
    for row in choice:  # exactly the labelled choice continues the context in its document
        assert len(row["choices"]) == local_tasks.CHOICES
        real = f"{row['context']} {row['choices'][row['label']]}"
        assert real in texts[row["doc"]]
        assert all(len(c.split()) == local_tasks.CHOICE_WORDS for c in row["choices"])


def test_local_task_requests_continue_the_text_as_written(tmp_path):
    """What lm-eval asks the model for each local example: the context and continuation joined
    are the held-out words as they stand (a cloze target without its leading space scores a
    different token, near chance, for every model alike)."""
    from lm_eval.api.model import LM

    class Recorder(LM):
        def __init__(self):
            super().__init__()
            self.requests = []

        def loglikelihood(self, requests):
            self.requests += [r.args for r in requests]
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests):
            raise AssertionError("the local tasks are not rolling")

        def generate_until(self, requests):
            raise AssertionError("the local tasks do not generate")

    texts = _texts(4)
    plan = runner.TaskPlan(names=local_tasks.build_local_tasks(
        texts, tmp_path, prefix="toy", n_examples=6, seed=3), include_paths=[str(tmp_path)])
    lm = Recorder()
    runner.run_tasks(lm, plan, bootstrap_iters=0)
    joined = [" ".join(t.split()) for t in texts]
    assert len(lm.requests) == 6 + 6 * local_tasks.CHOICES
    for context, continuation in lm.requests:
        assert continuation.startswith(" ") and not continuation.startswith("  ")
    cloze = [json.loads(x) for x in (tmp_path / "toy_cloze.jsonl").read_text().splitlines()]
    for row in cloze:
        assert (row["context"], " " + row["target"]) in lm.requests
        assert any(row["context"] + " " + row["target"] in text for text in joined)


def test_local_task_errors(tmp_path):
    with pytest.raises(ValueError, match="fewer than n_examples=999"):
        local_tasks.build_local_tasks(_texts(1), tmp_path, prefix="toy", n_examples=999, seed=0)
    with pytest.raises(ValueError, match="at least two documents"):
        local_tasks.build_local_tasks(_texts(1, docs=1), tmp_path, prefix="toy", n_examples=2,
                                      seed=0)
    local_tasks.build_local_tasks(_texts(1), tmp_path, prefix="toy", n_examples=4, seed=0)
    yaml_path = tmp_path / "toy_choice.yaml"
    good = yaml_path.read_text()
    yaml_path.write_text(good.replace("doc_to_choice: choices\n", ""))
    with pytest.raises(ValueError, match="missing field.*doc_to_choice"):
        local_tasks.validate_task_file(yaml_path)
    yaml_path.write_text(good.replace("doc_to_target: label", "doc_to_target: answer"))
    with pytest.raises(ValueError, match="rows lack the field.*answer"):
        local_tasks.validate_task_file(yaml_path)
    (tmp_path / "toy_choice.jsonl").unlink()
    yaml_path.write_text(good)
    with pytest.raises(ValueError, match="data file .* does not exist"):
        local_tasks.validate_task_file(yaml_path)


def _tiny_pair(seed: int, *, masked: bool):
    """A tiny random HF LLaMA on the embedded tokenizer's vocabulary and the same weights as a
    Megatron GPTModel (TP 1), optionally under the same random 2:4 masks on both."""
    from megatron.sparse.convert.hf_to_megatron import hf_to_megatron
    from megatron.sparse.convert.megatron_to_hf import linear_to_hf
    from megatron.sparse.layers import sparse_layers
    from megatron.sparse.model import LlamaArgs

    hf = tiny_hf_model("tied_gqa", seed=seed)
    hf.resize_token_embeddings(49152)  # the embedded tokenizer's ids
    hf.config.max_position_embeddings = 128
    args = LlamaArgs.from_hf_config(hf.config.to_dict())
    model = args.build(mask_kind="fixed" if masked else "dense")
    missing, unexpected = model.load_state_dict(hf_to_megatron(hf.state_dict(), args),
                                                strict=False)
    assert not unexpected and all("mask" in k or "_extra_state" in k for k in missing), missing
    if masked:
        gen = torch.Generator().manual_seed(seed)
        params = dict(hf.named_parameters())
        with torch.no_grad():
            for name, layer in sparse_layers(model):
                shape = layer.mask_shape("fixed")
                layer.set_mask_choice(torch.randint(0, 6, shape, generator=gen))  # 6 of 2:4
                mask = layer.eval_mask().float()
                for key, m in linear_to_hf(f"{name}.weight", mask, args).items():
                    params[key].mul_(m)
    return hf.eval(), model.eval()


def _adapter(model, batch_size: int = 3):
    from megatron.sparse.data.tokenizer import load_tokenizer
    from megatron.sparse.eval.zeroshot.megatron_lm import MegatronLM, ShardedForward

    return MegatronLM(forward=ShardedForward(model=model), tokenizer=load_tokenizer("embedded"),
                      max_length=128, batch_size=batch_size)


def _requests(kind: str, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i)
            for i, a in enumerate(args_list)]


def test_loglikelihood_matches_transformers():
    """sum log p(continuation | context) from the adapter vs log_softmax of the HF logits."""
    from megatron.sparse.data.tokenizer import load_tokenizer

    tok = load_tokenizer("embedded")
    pairs = [("The river runs past the old", " stone bridge"), ("A", " b c d e"),
             ("Morning light over the harbor and the", " village"), ("", "Hello world")]
    with parallel.distributed(1):
        hf, model = _tiny_pair(3, masked=True)
        lm = _adapter(model)
        got = lm.loglikelihood(_requests("loglikelihood", pairs))
        rolling = lm.loglikelihood_rolling(_requests("loglikelihood_rolling",
                                                     [("winter summer bridge",)]))
        generated = lm.generate_until(_requests(
            "generate_until", [("The river", {"until": ["\n\n"], "max_gen_toks": 5})]))
    for (context, continuation), (score, greedy) in zip(pairs, got):
        ctx = tok.encode(context) if context else [tok.eos_token_id]  # no BOS for SmolLM2
        whole = tok.encode(context + continuation)
        cont = whole[len(ctx):] if context else tok.encode(continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = hf(input_ids=ids).logits.double().log_softmax(-1)[0, len(ctx) - 1:-1]
        target = torch.tensor(cont)
        # both score in float64 from float32 logits that agree to ~1e-6 (measured 2e-7); a
        # log-softmax moves by <= 2 max|dlogit| per token; < 10 tokens here
        assert abs(score - float(logp.gather(-1, target[:, None]).sum())) < 2e-5
        assert greedy == bool((logp.argmax(-1) == target).all())
    ids = [tok.eos_token_id] + tok.encode("winter summer bridge")
    with torch.no_grad():
        logp = hf(input_ids=torch.tensor([ids])).logits.double().log_softmax(-1)[0, :-1]
    assert abs(rolling[0] - float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())) < 2e-5
    prompt = tok.encode("The river")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                          pad_token_id=tok.eos_token_id)[0, len(prompt):]
    assert generated == [tok.decode(ref.tolist()).split("\n\n")[0]]


def test_megatron_and_hflm_agree_per_example_on_local_tasks(tmp_path):
    """The same masked weights through the adapter and lm-eval's stock HFLM: equal loglikelihoods
    (fp32 logits agree to ~1e-6 per token, < 20 tokens per choice) and equal per-example
    accuracy on both local tasks."""
    from lm_eval.models.huggingface import HFLM

    from megatron.sparse.data.tokenizer import load_tokenizer

    plan = runner.TaskPlan(names=local_tasks.build_local_tasks(
        _texts(2), tmp_path, prefix="toy", n_examples=10, seed=1), include_paths=[str(tmp_path)])
    with parallel.distributed(1):
        hf, model = _tiny_pair(4, masked=True)
        ours = runner.run_tasks(_adapter(model, batch_size=4), plan)
    # the reference runs in float64 end to end (HFLM's log-softmax is in the model's dtype: in
    # fp32 its 49k-term exp-sum is off by up to ~3e-5 per token); ours scores fp32 logits in fp64
    stock = runner.run_tasks(HFLM(pretrained=hf.double(), tokenizer=load_tokenizer("embedded"),
                                  batch_size=4, max_length=128), plan)
    for task in plan.names:
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(stock["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] == list(range(10))
        for x, y in zip(a, b):
            lx = torch.tensor([r[0] for r in x["filtered_resps"]], dtype=torch.float64)
            ly = torch.tensor([r[0] for r in y["filtered_resps"]], dtype=torch.float64)
            assert torch.allclose(lx, ly, atol=2e-5, rtol=0), (task, lx, ly)
            assert x["acc"] == y["acc"]


def test_bootstrap_runs_in_process_and_env_is_restored(tmp_path, monkeypatch):
    """lm-eval's bootstrap stderr forks ``multiprocessing.Pool(cpu_count)`` unless
    ``DISABLE_MULTIPROC`` is set; forked from a process holding the model and gloo groups it
    deadlocked a CI run. ``run_tasks`` must never create a pool, and must leave the env as found."""
    import multiprocessing

    def no_pool(*args, **kwargs):
        raise AssertionError("run_tasks created a multiprocessing.Pool")

    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    plan = runner.TaskPlan(names=local_tasks.build_local_tasks(
        _texts(3), tmp_path, prefix="toy", n_examples=4, seed=2), include_paths=[str(tmp_path)])
    with parallel.distributed(1):
        _, model = _tiny_pair(5, masked=False)
        result = runner.run_tasks(_adapter(model), plan, bootstrap_iters=200)
    assert "DISABLE_MULTIPROC" not in os.environ
    stderrs = [v for task in plan.names for k, v in result["results"][task].items()
               if "_stderr" in k and isinstance(v, float)]
    assert stderrs and all(math.isfinite(v) and v >= 0 for v in stderrs), result["results"]


def _one_line_error(*args: str) -> str:
    result = run_tool_in_process("eval_zeroshot", "--model", "embedded", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


def test_bad_inputs_one_line_errors(tmp_path):
    local_tasks.build_local_tasks(_texts(0), tmp_path, prefix="toy", n_examples=4, seed=0)
    bad = tmp_path / "toy_cloze.yaml"
    bad.write_text(bad.read_text().replace("output_type: loglikelihood\n", ""))
    assert "missing field(s) output_type" in _one_line_error("--tasks", str(bad))
    assert "--limit must be >= 1" in _one_line_error("--tasks", "local", "--limit", "0")


@pytest.mark.slow
def test_unknown_task_one_line_error():
    """Slow only because lm-eval indexes its ~15k registry tasks (~10 s) to know the name."""
    assert "unknown task 'no_such_task'" in _one_line_error("--tasks", "local,no_such_task")


def test_result_rows_and_table():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                 "perplexity,none": 3.0, "perplexity_stderr,none": "N/A"}}}
    rows = runner.result_rows(results)
    assert rows == [{"task": "t", "metric": "acc", "value": 0.5, "stderr": 0.1},
                    {"task": "t", "metric": "perplexity", "value": 3.0, "stderr": None}]
    assert runner.format_table(rows).splitlines()[1].split() == ["t", "acc", "0.5000", "0.1000"]


@pytest.mark.slow
def test_embedded_tp1_tp3_and_hf_agree_per_example(embedded_dense, tmp_path):
    """The embedded model at TP 1 and TP 3 (torchrun) and through HFLM: same per-example
    accuracy on the embedded held-out tasks (first 8 examples of each)."""
    out = {}
    for name, args, nproc in [("tp1", ["--load", embedded_dense, "--tp", 1], 1),
                              ("tp3", ["--load", embedded_dense], 3),
                              ("hf", ["--model", "embedded"], 1)]:
        path = tmp_path / f"{name}.json"
        result = run_tool("eval_zeroshot", *args, "--tasks", "local", "--limit", 8,
                          "--output", path, nproc=nproc, OMP_NUM_THREADS="1")
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = json.loads(Path(path).read_text())
    assert "embedded_choice" in out["tp1"]["examples"]
    for task in runner.EMBEDDED_TASKS:
        acc = {name: [e["acc"] for e in o["examples"][task]] for name, o in out.items()}
        assert len(acc["tp1"]) == 8 and acc["tp1"] == acc["tp3"] == acc["hf"], (task, acc)
