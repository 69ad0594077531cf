"""OPT decoder (facebook/opt-125m ... opt-66b): the paper's main model family, which mlx-lm lacks.

ReLU FFN with biases, learned positions with OPT's offset of 2, pre-LN (most
sizes) or post-LN (opt-350m), and project_in/out where word_embed_proj_dim
differs from hidden_size. Checkpoint keys are kept; `fc1`/`fc2` become
`mlp.up_proj`/`mlp.down_proj` so every architecture has the same FFN names. In mlx-lm's style
(ModelArgs, attention, block, model), with its KV cache and masks; the FFN module `mlp` is the
mode's provider, set by sources.instantiate.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (fairseq's padding legacy)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int  # d_model
    num_hidden_layers: int
    ffn_dim: int  # d_ff: neurons per FFN
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    word_embed_proj_dim: Optional[int] = None  # != hidden_size -> project_in / project_out
    do_layer_norm_before: bool = True  # False for opt-350m (post-LN)
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    _remove_final_layer_norm: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size


def attend(q: mx.array, k: mx.array, v: mx.array, cache, mask, scale: float) -> mx.array:
    """Queries (B, H, L, D) against the cached keys and values plus these; returns (B, L, H*D)."""
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    out = scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)
    B, _, L, _ = q.shape
    return out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, H, L, D) -> (B, L, H*D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, bias = args.hidden_size, args.enable_bias
        self.n_heads = args.num_attention_heads
        self.scale = (dim // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        # (B, L, H*D) -> (B, H, L, D)
        q, k, v = (
            p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        return self.out_proj(attend(q, k, v, cache, mask, self.scale))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.pre_ln = args.do_layer_norm_before
        affine = args.layer_norm_elementwise_affine
        self.self_attn = Attention(args)
        self.self_attn_layer_norm = nn.LayerNorm(args.hidden_size, affine=affine)
        self.mlp = nn.Module()  # the FFN provider of the mode (sources.instantiate)
        self.final_layer_norm = nn.LayerNorm(args.hidden_size, affine=affine)

    def __call__(self, h: mx.array, mask=None, cache=None) -> mx.array:
        if self.pre_ln:
            h = h + self.self_attn(self.self_attn_layer_norm(h), mask, cache)
            return h + self.mlp(self.final_layer_norm(h))
        h = self.self_attn_layer_norm(h + self.self_attn(h, mask, cache))
        return self.final_layer_norm(h + self.mlp(h))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, e = args.hidden_size, args.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(args.vocab_size, e)
        self.embed_positions = nn.Embedding(args.max_position_embeddings + POSITION_OFFSET, d)
        if e != d:
            self.project_in = nn.Linear(e, d, bias=False)
            self.project_out = nn.Linear(d, e, bias=False)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        if args.do_layer_norm_before and not args._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(d, affine=args.layer_norm_elementwise_affine)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if "project_in" in self:
            h = self.project_in(h)
        cache = cache or [None] * len(self.layers)
        offset = cache[0].offset if cache[0] is not None else 0
        positions = mx.arange(offset, offset + h.shape[1]) + POSITION_OFFSET
        h = h + self.embed_positions(positions)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        if "final_layer_norm" in self:
            h = self.final_layer_norm(h)
        if "project_out" in self:
            h = self.project_out(h)
        return h


class OPTModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = Decoder(args)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = OPTModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.word_embed_proj_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        h = self.model.decoder(inputs, cache, input_embeddings)
        return self.model.decoder.embed_tokens.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h)

    @property
    def layers(self):
        return self.model.decoder.layers

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        out = {}
        for k, v in weights.items():
            if k.startswith("decoder."):  # OPTModel checkpoints without the "model." prefix
                k = "model." + k
            k = k.replace(".fc1.", ".mlp.up_proj.").replace(".fc2.", ".mlp.down_proj.")
            out[k] = v
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out
