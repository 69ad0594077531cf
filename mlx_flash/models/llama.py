"""Llama-family decoder (SmolLM2, Llama 2/3, ReluLLaMA, ProSparse, Mistral, Qwen2).

Attribute names match Hugging Face checkpoint keys, so loading needs no renaming.
The FFN (`mlp`) is a provider chosen by the loader: dense, naive mmap or flash.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
)
from mlx_lm.models.rope_utils import initialize_rope

from .base import CausalLM, attend
from .ffn import DenseFFN, FFNSpec


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int  # d_model
    num_hidden_layers: int
    intermediate_size: int  # d_ff: neurons per FFN
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    num_key_value_heads: Optional[int] = None  # GQA: fewer K/V heads than Q heads
    attention_bias: bool = False  # Qwen2 has Q/K/V biases
    mlp_bias: bool = False
    hidden_act: str = "silu"  # "relu" for ReluLLaMA / ProSparse
    rope_theta: float = 10000
    rope_traditional: bool = False
    rope_scaling: Optional[Dict[str, Union[float, str]]] = None
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.attention_bias = True

    @property
    def ffn_spec(self) -> FFNSpec:
        return FFNSpec(self.hidden_size, self.intermediate_size, True, self.mlp_bias, self.hidden_act)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
        )
        self.scale = self.head_dim**-0.5
        dim, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        # Llama puts attention_bias on o_proj too, Qwen2 only on Q/K/V
        o_bias = bias and args.model_type != "qwen2"
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=o_bias)
        self.rope = initialize_rope(
            self.head_dim, args.rope_theta, args.rope_traditional, args.rope_scaling,
            args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # (B, L, H*D) -> (B, H, L, D)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        return self.o_proj(attend(q, k, v, cache, mask, self.scale))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = DenseFFN(args.ffn_spec)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args, LlamaModel(args), args.hidden_size)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        return self.logits(self.model(inputs, cache, input_embeddings), self.model.embed_tokens)

    @property
    def layers(self):
        return self.model.layers

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
