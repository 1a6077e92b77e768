"""LLaMA-family GPTModel on megatron-core with sparse (2:4 masked) linear layers.

:class:`LlamaArgs` holds the Hugging Face ``LlamaConfig`` fields we need; :func:`llama_layer_spec`
injects the linear classes (sparse by default, megatron's dense ones for a baseline) and the
sparse layers' mask kind (dense, fixed or logits; see :mod:`megatron.sparse.layers`); and
``LlamaArgs.build()`` returns the ``GPTModel`` for the current tensor-parallel group.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron.sparse.layers import (
    SparseColumnParallelLinear,
    SparseRowParallelLinear,
    check_mask_kind,
    sparse_layers,
)
from megatron.sparse.mlp import SparseMLP


@dataclass
class LlamaArgs:
    """Architecture of a LLaMA-family model, in Hugging Face ``LlamaConfig`` terms."""

    hidden_size: int
    """Model width."""
    num_layers: int
    """Number of decoder layers (HF ``num_hidden_layers``)."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """KV heads (GQA groups); equal to ``num_attention_heads`` for MHA."""
    intermediate_size: int
    """SwiGLU FFN width."""
    vocab_size: int
    """Vocabulary size (rows of the embedding)."""
    max_position_embeddings: int = 4096
    """Longest sequence the RoPE table is built for."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """HF ``rope_scaling`` (only ``rope_type: llama3`` is supported)."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    head_dim: int | None = None
    """Per-head width; ``hidden_size // num_attention_heads`` when None."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other HF config fields, carried through conversion untouched."""
    block_configs: list[dict[str, Any]] | None = None
    """Per-layer sizes of a structurally sliced model (megatron-core ``block_configs`` entries,
    see :mod:`megatron.sparse.structured.hetero`); None for a uniform model."""

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "LlamaArgs":
        """Read a HF ``config.json`` dict of a LLaMA-architecture model."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type") == "sliced_llama":  # our per-layer export (structured/)
            from megatron.sparse.structured.hf_export import megatron_block_configs

            plain = {k: v for k, v in cfg.items() if k not in ("block_configs", "auto_map")}
            return cls.from_hf_config(plain | {"model_type": "llama",
                                               "architectures": ["LlamaForCausalLM"]}).with_blocks(
                megatron_block_configs(cfg))
        if cfg.get("model_type", "llama") != "llama" or archs[0] != "LlamaForCausalLM":
            raise ValueError(f"unsupported architecture {archs[0]} (model_type "
                             f"{cfg.get('model_type')!r}); only LlamaForCausalLM is supported")
        known = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta",
                 "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "head_dim"}
        rope_theta = cfg.get("rope_theta")
        rope_scaling = cfg.get("rope_scaling")
        params = cfg.get("rope_parameters")  # transformers >= 5 nests both here
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return cls(
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim"),
            extra={k: v for k, v in cfg.items() if k not in known and k != "rope_parameters"},
        )

    def with_blocks(self, block_configs: list[dict[str, Any]] | None) -> "LlamaArgs":
        """A copy with per-layer sizes (see :mod:`megatron.sparse.structured.hetero`)."""
        return LlamaArgs.from_dict(self.to_dict() | {"block_configs": block_configs})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["block_configs"] is None:  # uniform models keep the pre-slicing format
            del d["block_configs"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self, tp_size: int, *, two_four: bool | None = None) -> None:
        """Raise a one-line ValueError if this model cannot be sharded over ``tp_size`` ranks.

        ``two_four``: also require the 2:4 divisibility of every sparse linear's input per rank
        (default: always for a uniform model, only when asked for a sliced one).
        """
        checks = [
            ("attention heads", self.num_attention_heads),
            ("KV heads", self.num_key_value_heads),
            ("FFN size (intermediate_size)", self.intermediate_size),
            ("vocab size", self.vocab_size),
        ]
        if tp_size < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {tp_size}")
        if self.block_configs:
            from megatron.sparse.structured.hetero import validate_layers

            checks = checks[3:]
            validate_layers(self, tp_size, two_four=bool(two_four))
        for what, n in checks:
            if n % tp_size != 0:
                raise ValueError(f"tensor-parallel size {tp_size} does not divide the {what} "
                                 f"({n}); pick a TP size that divides it")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"{self.num_attention_heads} attention heads are not a multiple of "
                             f"{self.num_key_value_heads} KV heads")
        for what, n in [("hidden size", self.hidden_size),
                        ("attention output per TP rank", self.num_attention_heads
                         * self.kv_channels // tp_size),
                        ("FFN size per TP rank", self.intermediate_size // tp_size)][
                            :1 if self.block_configs else 3]:
            if n % 4 != 0:
                raise ValueError(f"the {what} ({n}) is not divisible by 4, as 2:4 sparsity needs; "
                                 f"choose another TP size")
        if self.rope_scaling and self.rope_scaling.get("rope_type",
                                                       self.rope_scaling.get("type")) != "llama3":
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling}; only rope_type "
                             f"'llama3' is supported")

    def transformer_config(self, *, tp_size: int, params_dtype: torch.dtype,
                           initialize: bool = True) -> TransformerConfig:
        """The megatron-core TransformerConfig of this model (no fusions, CPU-safe).

        ``initialize=False`` skips the random weight init (the caller fills every weight).
        """
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            kv_channels=self.kv_channels,
            ffn_hidden_size=self.intermediate_size,
            normalization="RMSNorm",
            layernorm_epsilon=self.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            use_cpu_initialization=True,
            perform_initialization=initialize,
            tensor_model_parallel_size=tp_size,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            init_method_std=0.02,
        )

    def build(self, *, sparse: bool = True, mask_kind: str = "logits",
              params_dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None, initialize: bool = True) -> GPTModel:
        """Build the GPTModel for the current TP group (``sparse=False``: dense baseline).

        ``mask_kind`` is the sparse layers' mask: ``"logits"`` (learnable, the trainer's),
        ``"fixed"`` (one-shot or imported 2:4 choices) or ``"dense"`` (no mask tensor).
        :func:`megatron.sparse.checkpoint.load_model` picks it from the checkpoint.
        ``initialize=False`` leaves the weights uninitialised, for a caller that loads them all
        (a checkpoint load or a conversion): it saves the random init of every weight.
        """
        check_mask_kind(mask_kind)
        tp_size = (parallel_state.get_tensor_model_parallel_world_size()
                   if parallel_state.model_parallel_is_initialized() else 1)
        self.validate(tp_size, two_four=sparse and mask_kind != "dense")
        if self.block_configs and mask_kind == "dense":
            from megatron.sparse.structured.hetero import fits_two_four

            # sliced widths that 2:4 cannot group: megatron's dense linears (the same tensors)
            sparse = sparse and fits_two_four(self, tp_size)
        spec = llama_layer_spec(mask_kind=mask_kind) if sparse else llama_layer_spec(
            column_linear=ColumnParallelLinear, row_linear=RowParallelLinear, mlp=MLP)
        if self.block_configs:  # a structurally sliced model: per-layer sizes
            from megatron.sparse.structured import hetero

            config = hetero.hetero_transformer_config(self, tp_size=tp_size,
                                                      params_dtype=params_dtype,
                                                      initialize=initialize)
            spec = hetero.hetero_block_spec(spec, self)
        else:
            config = self.transformer_config(tp_size=tp_size, params_dtype=params_dtype,
                                             initialize=initialize)
        # megatron logs "Unknown MLP type" for any MLP subclass; SparseMLP resolves its TP group
        # from parallel_state exactly like MLP does, so the message is noise here.
        layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
        level = layer_logger.level
        layer_logger.setLevel(logging.ERROR)
        try:
            model = GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=self.vocab_size,
                max_sequence_length=self.max_position_embeddings,
                share_embeddings_and_output_weights=self.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_base=self.rope_theta,
                rotary_percent=1.0,
            )
        finally:
            layer_logger.setLevel(level)
        for name, layer in sparse_layers(model):  # the same streams at every TP size
            layer.noise_stream = zlib.crc32(name.encode())
        if self.rope_scaling:
            inv_freq = model.rotary_pos_emb.inv_freq
            model.rotary_pos_emb.inv_freq = llama3_scaled_inv_freq(inv_freq, self.rope_scaling)
        if device is not None:
            model = model.to(device)
        return model


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 RoPE frequency scaling with all four HF parameters."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > old_len / low
    short_wave = wavelen < old_len / high
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(long_wave, inv_freq / factor, torch.where(short_wave, inv_freq, blended))


def llama_layer_spec(*, column_linear: type = SparseColumnParallelLinear,
                     row_linear: type = SparseRowParallelLinear,
                     mlp: type = SparseMLP, mask_kind: str | None = None) -> ModuleSpec:
    """LLaMA decoder-layer spec (local backend, RMSNorm) with the given linear and MLP classes.

    ``mask_kind`` (sparse linears only) is passed to every linear's constructor through the spec.

    On a machine with transformer-engine the norms and core attention come from TE
    (:func:`megatron.sparse.te_spec.te_llama_layer_spec`); the linears are always these.
    """
    if mask_kind is not None:
        column_linear = ModuleSpec(module=column_linear, params={"mask_kind": mask_kind})
        row_linear = ModuleSpec(module=row_linear, params={"mask_kind": mask_kind})
    spec = _base_spec()
    attn = spec.submodules.self_attention.submodules
    attn.linear_qkv = column_linear
    attn.linear_proj = row_linear
    mlp_spec = spec.submodules.mlp
    mlp_spec.module = mlp
    mlp_spec.submodules.linear_fc1 = column_linear
    mlp_spec.submodules.linear_fc2 = row_linear
    return spec


def _base_spec() -> ModuleSpec:
    from megatron.sparse.te_spec import te_available, te_base_spec

    if te_available():
        return te_base_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def causal_attention_mask(seq_len: int, device=None) -> torch.Tensor:
    """Megatron's boolean ``[1, 1, s, s]`` attention mask (True = masked out)."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), 1)


def model_forward(model: GPTModel, tokens: torch.Tensor,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """Run a GPTModel on ``[batch, seq]`` token ids.

    Returns vocab-parallel logits ``[batch, seq, vocab / tp]``, or per-token losses
    ``[batch, seq]`` when ``labels`` are given (vocab-parallel cross entropy).
    """
    batch, seq = tokens.shape
    position_ids = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, -1)
    mask = causal_attention_mask(seq, tokens.device)
    return model(tokens, position_ids, mask, labels=labels)
