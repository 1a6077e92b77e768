"""A LLaMA whose layers have their own sizes (see configuration_sliced_llama.py).

Written by megatron-sparse next to the weights; load with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. Each layer is the
``transformers`` LLaMA attention / MLP with resized projections, or nothing where the block was
removed. A removed attention block still records empty keys and values in the KV cache so that
the cache length (read from layer 0) stays right during generation.
"""

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaRMSNorm,
)

from .configuration_sliced_llama import SlicedLlamaConfig


def _sliced_attention(config, layer_idx, kv_heads):
    attn = LlamaAttention(config=config, layer_idx=layer_idx)
    hd, h = attn.head_dim, config.hidden_size
    q_rows = kv_heads * attn.num_key_value_groups * hd
    bias = config.attention_bias
    attn.q_proj = nn.Linear(h, q_rows, bias=bias)
    attn.k_proj = nn.Linear(h, kv_heads * hd, bias=bias)
    attn.v_proj = nn.Linear(h, kv_heads * hd, bias=bias)
    attn.o_proj = nn.Linear(q_rows, h, bias=bias)
    return attn


def _sliced_mlp(config, width):
    mlp = LlamaMLP(config)
    h, bias = config.hidden_size, config.mlp_bias
    mlp.gate_proj = nn.Linear(h, width, bias=bias)
    mlp.up_proj = nn.Linear(h, width, bias=bias)
    mlp.down_proj = nn.Linear(width, h, bias=bias)
    mlp.intermediate_size = width
    return mlp


class SlicedLlamaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        block = config.block_configs[layer_idx]
        attn, ffn = block["attention"], block["ffn"]
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.self_attn = self.input_layernorm = self.mlp = self.post_attention_layernorm = None
        if not attn["no_op"]:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = _sliced_attention(config, layer_idx, attn["num_key_value_heads"])
        if not ffn["no_op"]:
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size,
                                                         eps=config.rms_norm_eps)
            self.mlp = _sliced_mlp(config, ffn["intermediate_size"])

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        if self.self_attn is not None:
            out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                    attention_mask=attention_mask, position_ids=position_ids,
                                    cache=cache, use_cache=use_cache,
                                    position_embeddings=position_embeddings, **kwargs)
            hidden_states = hidden_states + out
        elif cache is not None:
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class SlicedLlamaForCausalLM(LlamaForCausalLM):
    config_class = SlicedLlamaConfig
    _no_split_modules = ["SlicedLlamaDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.model.layers = nn.ModuleList(
            [SlicedLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()


__all__ = ["SlicedLlamaConfig", "SlicedLlamaForCausalLM"]
