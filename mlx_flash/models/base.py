"""What every architecture shares: attention over mlx-lm's KV cache, the LM head (tied or its own),
the FFN geometry."""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

from .ffn import FFNSpec


def attend(q: mx.array, k: mx.array, v: mx.array, cache, mask, scale: float) -> mx.array:
    """Queries (B, H, L, D) against the cached keys and values plus these; returns (B, L, H*D)."""
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    out = scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)
    B, _, L, _ = q.shape
    return out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, H, L, D) -> (B, L, H*D)


class CausalLM(nn.Module):
    """mlx-lm's model contract (`layers`, `__call__(inputs, cache)`, `make_cache`) around an architecture's body."""

    kv_step = 256  # tokens the KV cache grows by (mlx-lm's); flash mode allocates its whole context at once

    def __init__(self, args, body: nn.Module, head_dim: int):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = body
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(head_dim, args.vocab_size, bias=False)

    def make_cache(self) -> list:
        caches = [KVCache() for _ in self.layers]
        for c in caches:
            c.step = self.kv_step
        return caches

    def logits(self, h: mx.array, embed_tokens: nn.Embedding) -> mx.array:
        return embed_tokens.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h)

    @property
    def ffn_spec(self) -> FFNSpec:
        return self.args.ffn_spec
