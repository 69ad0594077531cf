"""The KV cache of the last conversation, kept between requests and reused by its common prefix.

Each turn of a chat sends the whole conversation again. Its tokens up to where they differ from
what the cache already holds (the previous prompt and the answer generated to it) need not be
computed again: the cache is trimmed to that common prefix (mlx-lm's trim_prompt_cache) and only
the rest of the prompt runs, as mlx-lm's server and llama.cpp's do. One conversation is kept (a
menu-bar chat has one); its cache is the one the budget already plans for the context
(flash.budget's max_kv_size, allocated once), so keeping it costs no memory beyond the plan.

The cache's offset says how many tokens it holds; `tokens` are those tokens (prompt, then the
generated ones fed back), so a request cut short still leaves a consistent prefix. A request that
fails drops the cache: its layers may hold keys of different lengths.
"""

from typing import List, Optional, Tuple

from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache


def common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Conversation:
    """One model's kept KV cache and the tokens it holds."""

    def __init__(self, model):
        self.model = model
        self.cache: Optional[list] = None
        self.tokens: List[int] = []

    def reuse(self, ids: List[int]) -> Tuple[list, int]:
        """A cache for a request whose prompt is `ids`, and how many of its first tokens the cache holds
        already (at most len(ids) - 1: the last prompt token must run to give the first logits)."""
        held = 0
        if self.cache is not None:
            held = min(common_prefix(self.tokens, ids), len(ids) - 1)
            extra = self.offset() - held
            if extra and not (can_trim_prompt_cache(self.cache) and trim_prompt_cache(self.cache, extra) == extra):
                held = 0  # e.g. a sliding-window cache that has wrapped: start afresh
        if held == 0:
            self.cache = make_prompt_cache(self.model)
        self.tokens = list(ids[:held])
        return self.cache, held

    def offset(self) -> int:
        return self.cache[0].offset if self.cache else 0

    def record(self, ids: List[int], generated: List[int]):
        """After a request (finished or cut short): the tokens the cache now holds."""
        self.tokens = (list(ids) + list(generated))[: self.offset()]

    def drop(self):
        self.cache, self.tokens = None, []
