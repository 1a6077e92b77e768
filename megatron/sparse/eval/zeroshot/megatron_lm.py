"""An ``lm_eval`` language model over a megatron-sparse GPTModel at any tensor-parallel size.

Global rank 0 drives lm-eval; every forward it needs is broadcast to the other ranks (a
``[batch, seq]`` header, then the tokens), all ranks run the sharded model, and the
vocab-parallel logits are all-gathered so rank 0 scores the full vocabulary. The other ranks sit
in :func:`follow` until rank 0 sends the stop header (:meth:`ShardedForward.stop`). Data
parallelism is not used: the world size must equal the TP size.

Tokenization and request handling follow lm-eval's Hugging Face model (``HFLM``) for causal
LMs, so both sides score the same token sequences: the tokenizer's default special tokens,
an empty context replaced by the BOS (else EOS) token, right padding (harmless under the causal
mask), left truncation to the model's context length, rolling windows for
``loglikelihood_rolling``. ``generate_until`` is greedy (no sampling), without a KV cache.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from megatron.core import parallel_state

from megatron.sparse import parallel
from megatron.sparse.model import model_forward

_STOP = 0


class ShardedForward:
    """Full-vocabulary logits of the sharded model; called on rank 0, mirrored by followers."""

    def __init__(self, *, model: torch.nn.Module):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.tp = parallel.tp_size() if dist.is_initialized() else 1
        if self.world != self.tp:
            raise ValueError(f"zero-shot evaluation runs tensor parallel only: world size "
                             f"{self.world} != TP {self.tp}; launch TP processes")

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, vocab]`` float32 logits of ``[batch, seq]`` token ids."""
        tokens = tokens.to(self.device)
        if self.world > 1:
            dist.broadcast(torch.tensor(tokens.shape, device=self.device), src=0)
            dist.broadcast(tokens, src=0)
        return self._forward(tokens)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = model_forward(self.model, tokens)
        group = parallel_state.get_tensor_model_parallel_group() if self.tp > 1 else None
        return parallel.gather_last_dim(local, self.tp, group).float()

    def stop(self) -> None:
        """Release the follower ranks (rank 0, once, when it is done)."""
        if self.world > 1:
            dist.broadcast(torch.tensor([_STOP, _STOP], device=self.device), src=0)

    @torch.no_grad()
    def follow(self) -> None:
        """Run rank 0's forwards until it sends the stop header (ranks other than 0)."""
        while True:
            header = torch.empty(2, dtype=torch.long, device=self.device)
            dist.broadcast(header, src=0)
            if int(header[0]) == _STOP:
                return
            tokens = torch.empty(*header.tolist(), dtype=torch.long, device=self.device)
            dist.broadcast(tokens, src=0)
            self._forward(tokens)


class MegatronLM(TemplateLM):
    """lm-eval LM over :class:`ShardedForward` (rank 0 only)."""

    def __init__(self, *, forward: ShardedForward, tokenizer, max_length: int,
                 batch_size: int = 8, max_gen_toks: int = 256):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.forward, self.tokenizer = forward, tokenizer
        self._max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, None)
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """``(sum log p(continuation), all greedy)`` per ``(key, context, continuation)``."""
        rows = []
        for key, context, continuation in requests:
            if not continuation:
                raise ValueError(f"empty continuation for request {key!r}")
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((whole[:-1], continuation[-(len(whole) - 1):]))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = len(rows[batch[0]][0])
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for j, i in enumerate(batch):
                tokens[j, :len(rows[i][0])] = torch.tensor(rows[i][0])
            logits = self.forward.logits(tokens)
            for j, i in enumerate(batch):
                inp, cont = rows[i]
                # float64 on the scored rows only: an fp32 log-softmax over a 49k-128k vocab
                # rounds its exp-sum by ~1e-5 per token, which can flip near-tied choices
                lp = logits[j, len(inp) - len(cont):len(inp)].double().log_softmax(-1).cpu()
                target = torch.tensor(cont)
                score = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = (score, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        scores = []
        for (string,) in [req.args for req in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            parts = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
            scores.append(sum(p for p, _ in parts))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), scores[-1])
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for context, gen_kwargs in [req.args for req in requests]:
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1):]
            text = self._greedy(ids, max_new, until)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    def _greedy(self, ids: list[int], max_new: int, until: list[str]) -> str:
        new: list[int] = []
        text = ""
        for _ in range(max_new):
            window = (ids + new)[-self.max_length:]
            logits = self.forward.logits(torch.tensor([window]))
            token = int(logits[0, -1].argmax())
            if token == self.eot_token_id:
                break
            new.append(token)
            text = self.tok_decode(new)
            if any(stop in text for stop in until):
                break
        for stop in until:
            text = text.split(stop)[0]
        return text
