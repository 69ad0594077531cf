"""Lookahead prefetch (beyond the paper): read layer l+1's neurons while layer l computes.

The paper reads, then computes, layer after layer, so I/O and compute add up. Here layer l's
FFN input also feeds a lookahead predictor of layer l+1's active neurons (the residual stream
changes slowly between layers: Deja Vu), trained and calibrated like the others
(`train_predictors --lookahead`). Layer l's one host sync yields both predictions; once layer l
has read its own misses (on the same read threads, which a queued prefetch would delay), the
bundles of those predicted neurons that are not already in layer l+1's window are read on a
background thread into a staging area, while MLX computes layer l's FFN and layer l+1's attention. When layer l+1's own predictor has spoken:

- hits: prefetched bundles it needs are copied from the staging area into their rows;
- misses: the new neurons that were not prefetched are read then (the I/O left exposed);
- wasted: prefetched bundles it does not need are dropped. They never enter the window (no
  token's active set holds them, so the window's rules would drop them at the next step anyway).

Two staging areas alternate between even and odd layers: one is filled for layer l+1 while
layer l uses the other. Reads stay direct and CRC-checked; the plan counts both areas.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional, Tuple

import numpy as np

from ..format import BundleLayout
from .bundle_reader import BundleBuffer, BundleReader, ReadStats


class Prefetcher:
    """Background reads of bundles into two alternating staging areas, one pending read per layer."""

    def __init__(self, reader: BundleReader, layout: BundleLayout, rows: int):
        self.reader = reader
        self.stagings = [BundleBuffer(rows, layout) for _ in range(2)]
        # one coordinating thread: its read fans out to the reader's pool like any other read
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._pending: Dict[int, Tuple] = {}  # layer -> (future or None, neurons)

    @property
    def nbytes(self) -> int:
        return sum(s.np.nbytes for s in self.stagings)

    def start(self, layer: int, neurons: np.ndarray) -> int:
        """Read the bundles of `neurons` (sorted; at most a staging area's rows are kept) of `layer` in
        the background; returns how many were asked for."""
        self.take(layer)  # a read still pending for this layer writes into the same area: let it finish
        staging = self.stagings[layer % 2]
        neurons = neurons[: staging.slots]
        future = self._pool.submit(self.reader.read, layer, neurons, staging) if len(neurons) else None
        self._pending[layer] = (future, neurons)
        return len(neurons)

    def take(self, layer: int) -> Optional[Tuple[np.ndarray, np.ndarray, ReadStats, float]]:
        """Wait for `layer`'s pending read: (neurons, their staged bundles, the read, seconds waited),
        or None when none was started. A failed read raises here, as a direct read would."""
        entry = self._pending.pop(layer, None)
        if entry is None:
            return None
        future, neurons = entry
        t0 = time.perf_counter()
        read = future.result() if future is not None else ReadStats(direct=self.reader.direct)
        return neurons, self.stagings[layer % 2].np[: len(neurons)], read, time.perf_counter() - t0

    def close(self):
        for layer in list(self._pending):
            try:
                self.take(layer)
            except Exception:  # closing: a read that failed has nobody left to tell
                pass
        self._pool.shutdown(wait=True)
