"""Heterogeneous (per-layer sized) LLaMA on megatron-core: the model a structural slice leaves.

Per-layer sizes live in ``LlamaArgs.block_configs``, one entry per layer in the format of
megatron-core's :class:`HeterogeneousTransformerConfig` (the Llama-Nemotron ``block_configs``)::

    {"attention": {"no_op": false, "num_query_groups": 2},
     "mlp": {"no_op": false, "ffn_hidden_size": 1152}}

``num_query_groups`` is the number of KV groups the layer keeps, each with all of its
``num_attention_heads / num_key_value_heads`` query heads (the model-level fields keep the
unsliced values, so the heads per group stay known); ``no_op`` removes the block with its norm.

megatron-core 0.16.1 builds per-layer configs from that list (:meth:`get_config_for_layer`) and
saves per-layer (non-stacked) checkpoint keys, but it cannot express this model alone: its
``get_config_for_layer`` changes ``num_query_groups`` and keeps ``num_attention_heads`` (the
Nemotron-NAS variant shares query heads among fewer KV heads; removing whole groups removes query
heads too), and its layer specs hard-code megatron's dense linears and MLP. So
:class:`SlicedTransformerConfig` also sets the per-layer query heads, and
:func:`hetero_block_spec` builds the per-layer specs from our own (sparse) layer spec.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.heterogeneous.heterogeneous_config import (
    HeterogeneousTransformerConfig,
)
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer keeps."""

    num_query_groups: int
    """KV groups kept (each with its query heads); 0: the attention block is removed."""
    ffn_hidden_size: int
    """MLP channels kept; 0: the MLP block is removed."""

    def block_config(self) -> dict[str, Any]:
        """This layer as a megatron-core ``block_configs`` entry."""
        attn, mlp = self.num_query_groups, self.ffn_hidden_size
        return {"attention": {"no_op": attn == 0, "replace_with_linear": False,
                              "num_query_groups": attn or None},
                "mlp": {"no_op": mlp == 0, "replace_with_linear": False,
                        "ffn_hidden_size": mlp or None}}

    @classmethod
    def from_block_config(cls, block: dict[str, Any], args) -> "LayerShape":
        attn, mlp = block["attention"], block.get("mlp") or block["ffn"]
        if attn.get("replace_with_linear") or mlp.get("replace_with_linear"):
            raise ValueError("block_configs with replace_with_linear are not supported (a "
                             "structural slice only keeps or removes blocks)")
        groups = 0 if attn.get("no_op") else attn.get("num_query_groups") or \
            args.num_key_value_heads
        ffn = 0 if mlp.get("no_op") else mlp.get("ffn_hidden_size") or args.intermediate_size
        return cls(num_query_groups=int(groups), ffn_hidden_size=int(ffn))


def layer_shapes(args) -> list[LayerShape]:
    """Every layer's kept sizes (the uniform sizes when ``args.block_configs`` is None)."""
    if not args.block_configs:
        return [LayerShape(num_query_groups=args.num_key_value_heads,
                           ffn_hidden_size=args.intermediate_size)] * args.num_layers
    if len(args.block_configs) != args.num_layers:
        raise ValueError(f"block_configs lists {len(args.block_configs)} layers but the model has "
                         f"{args.num_layers}")
    return [LayerShape.from_block_config(b, args) for b in args.block_configs]


def heads_per_group(args) -> int:
    return args.num_attention_heads // args.num_key_value_heads


def layer_args(args, layer: int):
    """A uniform ``LlamaArgs`` with layer ``layer``'s sizes (for per-layer tensor layouts).

    A removed block keeps the unsliced size there; its tensors do not exist.
    """
    shape = layer_shapes(args)[layer]
    groups = shape.num_query_groups or args.num_key_value_heads
    return type(args)(**{**{f.name: getattr(args, f.name) for f in fields(args)},
                         "num_key_value_heads": groups,
                         "num_attention_heads": groups * heads_per_group(args),
                         "intermediate_size": shape.ffn_hidden_size or args.intermediate_size,
                         "head_dim": args.kv_channels, "block_configs": None})


def layer_problem(args, shape: LayerShape, tp: int, two_four: bool = True) -> str | None:
    """Why ``shape`` cannot be sharded over ``tp`` ranks (None when it can); ``two_four`` also
    asks for the 2:4 divisibility (by 4) of the row-parallel inputs per rank."""
    if shape.num_query_groups % tp:
        return f"{shape.num_query_groups} KV groups are not divisible by TP {tp}"
    if shape.ffn_hidden_size % tp:
        return f"{shape.ffn_hidden_size} MLP channels are not divisible by TP {tp}"
    if not two_four:
        return None
    if (shape.ffn_hidden_size // tp) % 4:
        return (f"{shape.ffn_hidden_size // tp} MLP channels per rank at TP {tp} are not "
                f"divisible by 4 (2:4 sparsity of linear_fc2's input)")
    if (shape.num_query_groups * heads_per_group(args) * args.kv_channels // tp) % 4:
        return f"the attention output per rank at TP {tp} is not divisible by 4"
    return None


def valid_tp_sizes(args, *, two_four: bool = True, limit: int = 64) -> list[int]:
    """TP sizes at which every layer (and the vocabulary) can be sharded."""
    shapes = layer_shapes(args)
    return [tp for tp in range(1, limit + 1) if args.vocab_size % tp == 0
            and all(layer_problem(args, s, tp, two_four) is None for s in shapes)]


def fits_two_four(args, tp: int) -> bool:
    """Whether every layer's sparse linears can be grouped 2:4 at TP ``tp``."""
    return all(layer_problem(args, s, tp) is None for s in layer_shapes(args))


def validate_layers(args, tp: int, *, two_four: bool = True) -> None:
    """One-line ValueError naming the first layer that TP ``tp`` cannot shard."""
    shapes = layer_shapes(args)
    if args.num_attention_heads % args.num_key_value_heads:
        raise ValueError(f"{args.num_attention_heads} attention heads are not a multiple of "
                         f"{args.num_key_value_heads} KV heads")
    for i, shape in enumerate(shapes):
        if shape.num_query_groups > args.num_key_value_heads or \
                shape.ffn_hidden_size > args.intermediate_size or min(
                    shape.num_query_groups, shape.ffn_hidden_size) < 0:
            raise ValueError(f"layer {i} of block_configs ({shape}) exceeds the unsliced model "
                             f"({args.num_key_value_heads} KV groups, {args.intermediate_size} "
                             f"MLP channels)")
        problem = layer_problem(args, shape, tp, two_four)
        if problem:
            valid = ", ".join(map(str, valid_tp_sizes(args, two_four=two_four))) or "none"
            raise ValueError(f"layer {i} of this sliced model cannot run at TP {tp}"
                             f"{' with 2:4 sparsity' if two_four else ''}: {problem}; valid TP "
                             f"sizes: {valid}")


@dataclass
class SlicedTransformerConfig(HeterogeneousTransformerConfig):
    """megatron-core's heterogeneous config, with per-layer query heads as well as KV groups."""

    heads_per_query_group: int = 1
    """Query heads of one KV group (the unsliced ``num_attention_heads / num_query_groups``)."""

    def get_config_for_layer(self, layer_number: int) -> TransformerConfig:
        block = self.per_block_parameters[layer_number - 1]
        values = {f.name: getattr(self, f.name) for f in fields(TransformerConfig)}
        if not block.attention.no_op and block.attention.num_query_groups:
            values["num_query_groups"] = block.attention.num_query_groups
            values["num_attention_heads"] = (block.attention.num_query_groups
                                             * self.heads_per_query_group)
        if not block.mlp.no_op and block.mlp.ffn_hidden_size:
            values["ffn_hidden_size"] = block.mlp.ffn_hidden_size
        return TransformerConfig(**values)


def hetero_transformer_config(args, *, tp_size: int, params_dtype,
                              initialize: bool = True) -> SlicedTransformerConfig:
    """The sliced model's megatron-core config. Its model-wide sizes are the first kept layer's,
    so that megatron-core's model-wide checks hold at every TP size valid for the layers."""
    shapes = layer_shapes(args)
    groups = next((s.num_query_groups for s in shapes if s.num_query_groups),
                  args.num_key_value_heads)
    ffn = next((s.ffn_hidden_size for s in shapes if s.ffn_hidden_size), args.intermediate_size)
    uniform = type(args).from_dict(args.to_dict() | {
        "num_key_value_heads": groups, "num_attention_heads": groups * heads_per_group(args),
        "intermediate_size": ffn, "head_dim": args.kv_channels, "block_configs": None})
    base = uniform.transformer_config(tp_size=tp_size, params_dtype=params_dtype,
                                      initialize=initialize)
    values = asdict(base) | {
        "heads_per_query_group": heads_per_group(args),
        "heterogeneous_layers_config_encoded_json": json.dumps(
            {"block_configs": [s.block_config() for s in shapes]})}
    names = {f.name for f in fields(SlicedTransformerConfig) if f.init}
    return SlicedTransformerConfig(**{k: v for k, v in values.items() if k in names})


def hetero_block_spec(layer_spec: ModuleSpec, args) -> TransformerBlockSubmodules:
    """Per-layer copies of ``layer_spec`` with removed blocks (and their norms) as no-ops."""
    from megatron.core.transformer.transformer_block import LayerNormImpl

    specs = []
    for shape in layer_shapes(args):
        spec = copy.deepcopy(layer_spec)
        sub = spec.submodules
        if shape.num_query_groups == 0:
            sub.input_layernorm = IdentityOp
            sub.self_attention = ModuleSpec(module=IdentityOp)
            sub.self_attn_bda = IdentityFuncOp
        if shape.ffn_hidden_size == 0:
            sub.pre_mlp_layernorm = IdentityOp
            sub.mlp = ModuleSpec(module=IdentityOp)
            sub.mlp_bda = IdentityFuncOp
        specs.append(spec)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=LayerNormImpl)
