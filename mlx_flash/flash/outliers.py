"""Outlier neurons, pinned in DRAM: the few whose miss costs most are never left to the predictor.

Llama-family models have "massive activations" (Sun et al., 2024): a handful of FFN neurons fire
hugely on a sequence's first token (the attention sink every later token reads) and on some
delimiters. One of 1,536 neurons is invisible to a recall measured in counts, yet missing it
leaves that token's FFN output wrong by 75% and the whole sequence drifts (README, "Quality").
This is PowerInfer's "hot neurons" idea applied to the neurons whose miss costs most: they stay
in a small per-layer buffer outside the sliding window, read once at load and computed every token.

The rule, chosen from data: neuron j of layer l is pinned iff its largest contribution over the
calibration tokens, C_lj = max_t |h_tj| * ||down_j||, is at least `ratio` times the layer's
typical largest contribution (median over j of C_lj, neurons that never fire left out), at most
`max_per_layer` per layer. On SmolLM2-135M as `prepare` calibrates it (flash.json,
`pin_rule.largest_ratios`) the three massive ones stand far off: 3,364 and 1,275 (layer 11 neurons
1229 and 1487) and 522 (layer 28 neuron 678), all on first tokens; then layer 2's neurons 90 and 430
(122 and 102, pinned too: 2.7 kB), layer 9's 200 (82, not), and every other neuron below 66.
ReLU models (the tiny OPT and ReLU Llama of the tests) have none.
"""

from typing import List

import mlx.core as mx
import numpy as np

from ..format import FlashConfig
from ..models.ffn import bundle_ffn
from .neuron_cache import NeuronBuffer

DEFAULT_RATIO = 100.0
DEFAULT_MAX_PER_LAYER = 8


def pinned_neurons(max_contribution: np.ndarray, ratio: float = DEFAULT_RATIO,
                   max_per_layer: int = DEFAULT_MAX_PER_LAYER) -> List[int]:
    """One layer's neurons to pin, from (d_ff,) C_j = max_t |h_tj| * ||down_j||: largest first."""
    fired = max_contribution[max_contribution > 0]
    if not fired.size:
        return []
    typical = float(np.median(fired))
    order = np.argsort(-max_contribution, kind="stable")[:max_per_layer]
    return [int(j) for j in order if max_contribution[j] >= ratio * typical]


def ratios(max_contribution: np.ndarray, top: int = 4) -> List[List[float]]:
    """[[neuron, C_j / median], ...] of a layer's `top` largest contributions (the rule's evidence)."""
    fired = max_contribution[max_contribution > 0]
    typical = float(np.median(fired)) if fired.size else 1.0
    order = np.argsort(-max_contribution, kind="stable")[:top]
    return [[int(j), round(float(max_contribution[j]) / typical, 1)] for j in order]


class PinnedNeurons:
    """One layer's pinned neurons: their bundles in a NeuronBuffer of their own, read once at load."""

    def __init__(self, layer: int, neurons: List[int], cfg: FlashConfig, reader, staging, scratch: np.ndarray):
        self.neurons = np.sort(np.asarray(neurons, dtype=np.int64))
        self.buffer = NeuronBuffer(len(self.neurons), cfg.layout, scratch)
        for k in range(0, len(self.neurons), staging.slots):  # in rounds of the staging area
            part = self.neurons[k : k + staging.slots]
            reader.read(layer, part, staging)
            self.buffer.fill(slice(k, k + len(part)), staging.np[: len(part)])

    def __call__(self, x: mx.array, spec, quant) -> mx.array:
        """Their share of the FFN output for (N, d_model) inputs (no down bias: the window adds it)."""
        return bundle_ffn(x, spec, self.buffer.fields(len(self.neurons)), None, quant)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes
