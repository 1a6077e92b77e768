"""The AST training step vs a dense full-weight training step (``bench_train_step.py --ast``).

Every variant is one full optimizer step on the same model and batch: forward, backward and the
AdamW update of every parameter. Dense: the plain model with ``torch.optim.AdamW``. AST: the
sparse model under its magnitude 2:4 masks (straight-through), the SR-STE AdamW with the decay
on; "+ KD" adds the frozen dense teacher's forward and the vocab-parallel KL; "+ SLoRB" the
low-rank side branch (when megatron.sparse.slorb is available). Times are interleaved rep by
rep; memory is what the step holds at its peak, counted from the tensors themselves: parameters,
gradients, optimizer state, the teacher, and every tensor autograd saved for backward.
"""

from __future__ import annotations

import importlib.util

import torch

from megatron.sparse.layers import set_mask_state, sparse_layers
from megatron.sparse.model import LlamaArgs, model_forward
from megatron.sparse.train.ast import magnitude_choices
from megatron.sparse.train.distill import DistillConfig, FrozenTeacher, student_loss
from megatron.sparse.train.srste import SRSTEAdamW

from timing import interleaved_times, median, median_ratio  # benchmarks/timing.py


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


class _Variant:
    """One model + optimizer + loss; ``step()`` runs one training step."""

    def __init__(self, model, optimizer, loss_fn, teacher=None):
        self.model, self.optimizer, self.loss_fn, self.teacher = model, optimizer, loss_fn, teacher
        self.saved: list[torch.Tensor] = []

    def step(self, measure: bool = False) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        saved: list[torch.Tensor] = []

        def pack(t):
            if measure:
                saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss_fn()
        if measure:
            self.saved = saved
        loss.backward()
        self.optimizer.step()

    def memory(self) -> int:
        """Bytes of distinct tensors: parameters, gradients, optimizer state, the teacher, the
        cached boolean masks and what autograd saved in the measured step."""
        params = list(self.model.parameters())
        states = [v for s in self.optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor)]
        teacher = list(self.teacher.model.parameters()) if self.teacher else []
        masks = [layer._eval_cache[1] for _, layer in sparse_layers(self.model)
                 if layer._eval_cache is not None]
        return _tensor_bytes([*params, *(p.grad for p in params), *states, *teacher, *masks,
                              *self.saved])


def _ast_model(model_args: LlamaArgs, dtype, device, *, slorb_k: int):
    model = model_args.build(mask_kind="fixed", params_dtype=dtype, device=device)
    for _, layer in sparse_layers(model):
        layer.set_mask_choice(magnitude_choices(layer))
    set_mask_state(model, straight_through=True)
    extra = []
    if slorb_k:
        from megatron.sparse.slorb import attach_slorb

        extra = attach_slorb(model, k=slorb_k, train_projection=True)
    for p in model.parameters():
        p.requires_grad_(True)
    layers = {id(layer.weight): layer for _, layer in sparse_layers(model)}

    def pruned(p):
        layer = layers.get(id(p))
        return None if layer is None else ~layer.eval_mask()

    optimizer = SRSTEAdamW([{"params": [p for p in model.parameters()], "srste_decay": 6e-5}],
                           pruned_mask=pruned, lr=1e-5)
    return model, optimizer, extra


def run(model_args: LlamaArgs, *, batch: int, seq: int, reps: int, device, dtype) -> None:
    """Print the AST rows of the benchmark."""
    torch.manual_seed(0)
    tokens = torch.randint(0, model_args.vocab_size, (batch, seq + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    dense_model = model_args.build(sparse=False, params_dtype=dtype, device=device)
    dense = _Variant(dense_model, torch.optim.AdamW(dense_model.parameters(), lr=1e-5),
                     lambda: model_forward(dense_model, inputs, labels).float().mean())
    variants = {"dense full-weight": dense}
    teacher = FrozenTeacher(model_args.build(sparse=False, params_dtype=dtype, device=device))
    have_slorb = importlib.util.find_spec("megatron.sparse.slorb") is not None
    for name, kd, k in (("AST", False, 0), ("AST + KD", True, 0),
                        ("AST + KD + SLoRB k16", True, 16 if have_slorb else 0)):
        if name.endswith("k16") and not have_slorb:
            continue
        model, optimizer, _ = _ast_model(model_args, dtype, device, slorb_k=k)
        cfg = DistillConfig(kd_weight=0.5 if kd else 0.0)
        variants[name] = _Variant(
            model, optimizer,
            (lambda m=model, c=cfg, t=teacher if kd else None:
             student_loss(m, inputs, labels, c, t)[0]),
            teacher if kd else None)
    for v in variants.values():
        v.step(measure=True)
    samples = interleaved_times({name: v.step for name, v in variants.items()}, reps)
    n_tok = batch * seq
    print(f"full-weight training steps (forward + backward + AdamW), batch {batch} x seq {seq}")
    for name, v in variants.items():
        t = median(samples[name])
        ratio = median_ratio(samples, name, "dense full-weight")
        print(f"{name:22s}: {t * 1e3:9.1f} ms ({n_tok / t:7.0f} tok/s)  x{ratio:.3f} of dense  "
              f"memory {v.memory() / 2**20:8.1f} MiB")
    print("target: AST / dense <= 1.10")
