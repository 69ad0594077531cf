"""NeuronCache: the window's union is exactly rows [0, n), rows carry their bytes, memory stays put."""

from collections import deque

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flash_fixtures import direct_root, write_flash_model  # noqa: F401 (fixture)
from mlx_flash.errors import FlashError
from mlx_flash.flash.bundle_reader import BundleReader, alloc_buffer
from mlx_flash.flash.neuron_cache import NeuronBuffer, NeuronCache, fill_gaps, load_active
from mlx_flash.format import BUNDLES_FILE, BundleLayout, Field

ROW = 8  # packed bytes per neuron in the bookkeeping tests: fields "id" and "neg" = (id, ~id) as uint32
# bundles on "disk" carry 4 bytes of padding between the fields, which the packed rows drop
LAYOUT = BundleLayout(fields=[Field("id", 0, [1], "uint32"), Field("neg", 8, [1], "uint32")], nbytes=12,
                      stride=16, alignment=16)


def pattern(neurons):
    neurons = np.asarray(neurons, dtype=np.uint32)
    return np.stack([neurons, ~neurons], axis=1).view(np.uint8)  # (m, ROW): what a packed row holds


def bundles(neurons):
    out = np.zeros((len(neurons), LAYOUT.stride), np.uint8)  # (m, stride): what a read stages
    out[:, 0:4], out[:, 8:12] = pattern(neurons)[:, :4], pattern(neurons)[:, 4:]
    return out


def small_buffer(slots, scratch_rows=3):
    """A NeuronBuffer whose scratch holds only a few rows, so that moves take several rounds."""
    return NeuronBuffer(slots, LAYOUT, np.zeros(scratch_rows * 4, np.uint8))


class Reference:
    """The window rule written the slow, obvious way."""

    def __init__(self, d_ff, slots, k):
        self.slots, self.k, self.tokens = slots, k, deque()

    def union(self):
        return set().union(*self.tokens) if self.tokens else set()

    def step(self, active):
        seen, kept = set(), []
        for a in active:  # distinct ids in the given order, best first
            if a not in seen:
                seen.add(a)
                kept.append(a)
        self.tokens.append(set(kept[: self.slots]))
        while len(self.tokens) > self.k:
            self.tokens.popleft()
        while len(self.union()) > self.slots:
            self.tokens.popleft()
        return self.union()


@st.composite
def scenarios(draw):
    d_ff = draw(st.integers(1, 200))
    slots = draw(st.integers(1, 96))
    k = draw(st.integers(1, 6))
    hot = draw(st.integers(1, d_ff))  # a smaller id range makes tokens overlap, as real ones do
    token = st.lists(st.integers(0, hot - 1), max_size=min(2 * slots, 150))
    steps = draw(st.lists(st.tuples(token, st.booleans(), st.booleans()), min_size=1, max_size=30))
    return d_ff, slots, k, steps


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_cache_invariants(scenario):
    d_ff, slots, k, steps = scenario
    buf = small_buffer(slots)  # the MLX arrays whose rows move
    ptr = buf.addresses
    cache = NeuronCache(d_ff, slots, window=k, buffer=buf)
    ref = Reference(d_ff, slots, k)
    moved = 0
    for active, fail_read, reset in steps:
        if reset:
            cache.reset()
            ref.tokens.clear()
        before = set(cache.resident.tolist())
        n_before = cache.n
        new, rows = cache.step(np.array(active, dtype=np.int64))
        want = ref.step(active)
        assert np.all(np.diff(new) > 0) and np.all(np.diff(rows) > 0) and len(rows) == len(new)
        assert cache.n == len(want & before) + len(new) and np.all(rows < cache.n)
        assert cache.stats.rows_moved - moved <= max(0, n_before - cache.n)  # moves only when the window shrinks
        assert set(new.tolist()) == want - before  # exactly the union minus what was cached
        assert set(cache.resident.tolist()) - {-1} == want & before  # evicted: what left the window (-1: reserved)
        if fail_read:  # the read failed: nothing enters, next step asks again
            cache.abort()
            assert set(cache.window_union().tolist()) == want  # the token stays in the window
            want &= before
        else:
            buf.fill(rows, bundles(new))  # "read" the bundles
            cache.commit()
        # rows [0, n) are exactly the resident union, no holes, no duplicates
        res = cache.resident
        assert 0 <= cache.n <= slots and len(set(res.tolist())) == cache.n == len(want)
        assert set(res.tolist()) == want
        assert np.all(cache.slot_to_neuron[cache.n :] == -1)
        # the maps are mutually inverse
        np.testing.assert_array_equal(cache.neuron_to_slot[res], np.arange(cache.n))
        assert np.count_nonzero(cache.neuron_to_slot >= 0) == cache.n
        # each row's bytes followed its neuron, in numpy and in the MLX views alike
        np.testing.assert_array_equal(buf.rows(cache.n), pattern(res))
        if cache.n:
            np.testing.assert_array_equal(np.array(buf.fields(cache.n)["id"]), res.astype(np.uint32)[:, None])
        assert buf.addresses == ptr
        assert cache.stats.occupancy == cache.n / slots or fail_read
        moved = cache.stats.rows_moved


def test_window_slides_and_deletes_by_moving_last_rows():
    buf = small_buffer(6)
    cache = NeuronCache(d_ff=20, slots=6, window=2, buffer=buf)

    def step(active):
        new, rows = cache.step(np.array(active))
        buf.fill(rows, bundles(new))
        cache.commit()
        return new.tolist()

    assert step([5, 1, 3]) == [1, 3, 5]
    assert step([3, 7]) == [7]  # window {1,3,5} | {3,7}
    np.testing.assert_array_equal(cache.resident, [1, 3, 5, 7])
    assert step([7, 9]) == [9]  # {1, 5} left: 7 moves into 1's row, row of 5 freed at the end
    np.testing.assert_array_equal(cache.resident, [7, 3, 9])
    assert cache.stats.rows_moved == 1 and cache.stats.bytes_moved == ROW and cache.stats.evicted == 2
    np.testing.assert_array_equal(buf.rows(3), pattern([7, 3, 9]))
    assert cache.stats.new_neurons == 5 and cache.stats.last_new == 1


def test_row_moves_allocate_nothing_per_row():
    """Deleting moves the last rows into the holes through the preallocated scratch: no temporary of
    the moved rows (numpy's fancy indexing would build one; tracemalloc sees numpy's allocations)."""
    import tracemalloc

    layout = BundleLayout(fields=[Field("w", 0, [256], "float32")], nbytes=1024, stride=1536, alignment=512)
    buf = NeuronBuffer(2048, layout, np.zeros(64 * 1024, np.uint8))  # scratch: 64 rows
    cache = NeuronCache(d_ff=4096, slots=2048, window=1, buffer=buf)
    rng = np.random.default_rng(0)
    first = rng.choice(4096, 2000, replace=False)
    new, rows = cache.step(first)
    staged = np.zeros((len(new), layout.stride), np.uint8)
    staged[:, :4] = new.astype(np.uint32)[:, None].view(np.uint8)  # each row starts with its neuron id
    buf.fill(rows, staged)
    cache.commit()
    keep = rng.choice(first, 1000, replace=False)  # half leave, none arrive: about 500 rows move into holes
    tracemalloc.start()
    cache.step(keep)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    cache.commit()
    moved = cache.stats.bytes_moved
    assert moved >= 300 * 1024 and peak < moved / 4, (peak, moved)
    ids = buf.rows(cache.n)[:, :4].copy().view(np.uint32).ravel()
    np.testing.assert_array_equal(ids, cache.resident)  # every row still carries its own neuron


def test_window_shrinks_oldest_first_and_truncates():
    cache = NeuronCache(d_ff=100, slots=5, window=4)
    for active in ([0, 1], [2, 3]):
        cache.step(np.array(active))
        cache.commit()
    new, _ = cache.step(np.array([4, 5]))  # union 6 > 5: drop token [0, 1]
    cache.commit()
    assert new.tolist() == [4, 5] and cache.window_tokens == 2
    assert cache.stats.window_shrinks == 1 and cache.stats.tokens_dropped == 1
    np.testing.assert_array_equal(np.sort(cache.resident), [2, 3, 4, 5])
    new, _ = cache.step(np.array([50, 9, 40, 9, 30, 20, 10, 60]))  # 7 distinct > 5: best 5 kept
    cache.commit()
    assert new.tolist() == [9, 20, 30, 40, 50]
    assert cache.stats.truncations == 1 and cache.window_tokens == 1 and cache.n == 5


def test_coalescing_reads_gaps_once():
    new = np.array([1, 3, 10, 13])
    cached = np.zeros(20, dtype=bool)
    assert fill_gaps(new, 2, cached, 100).tolist() == [1, 2, 3, 10, 11, 12, 13]
    cached[11] = True  # a cached neuron is never read twice
    assert fill_gaps(new, 2, cached, 100).tolist() == [1, 2, 3, 10, 13]
    assert fill_gaps(new, 2, np.zeros(20, bool), 1).tolist() == [1, 2, 3, 10, 13]  # one spare row
    w = NeuronCache(20, 10, 2, coalesce_gap=2)
    ids, _ = w.step(np.array([1, 3]))
    w.commit()
    assert ids.tolist() == [1, 2, 3] and w.stats.filled == 1
    ids, _ = w.step(np.array([2, 3]))  # the filler stays because it is now predicted: nothing read
    w.commit()
    assert ids.tolist() == [] and sorted(w.resident.tolist()) == [1, 2, 3]
    ids, _ = w.step(np.array([7]))  # 1 left the window (it was only in the first token's set)
    w.commit()
    assert ids.tolist() == [7] and sorted(w.resident.tolist()) == [2, 3, 7]


def test_step_requires_commit_or_abort():
    cache = NeuronCache(d_ff=10, slots=4, window=2)
    cache.step(np.array([1]))
    with pytest.raises(AssertionError, match="commit"):
        cache.step(np.array([2]))
    with pytest.raises(IndexError):
        NeuronCache(d_ff=10, slots=4).step(np.array([10]))


def packed(rows, layout):
    """Whole bundles (m, stride) -> packed rows (m, field bytes), as a NeuronBuffer holds them."""
    return np.concatenate([rows[:, f.offset : f.offset + f.nbytes] for f in layout.fields], axis=1)


# bundles whose fields are all unaligned (read through the staging area), whose float rows are
# 512-byte multiples (read straight into the packed arrays), and 4-bit ones (weights straight in,
# scales and biases through scratch)
GEOMETRIES = {"staged": {}, "direct": {"d_model": 256}, "direct-q4": {"d_model": 1024, "quantization": {
    "bits": 4, "group_size": 64}}}


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_with_reader_end_to_end(direct_root, geometry):
    """The per-token sequence on a real file: rows [0, n) always hold the resident neurons' fields,
    and the FFN computes on them through MLX views."""
    folder = direct_root / f"cache-e2e-{geometry}"
    cfg, bundles = write_flash_model(folder, n_layers=2, seed=7, **GEOMETRIES[geometry])
    slots = 64
    staging = alloc_buffer(5, cfg.layout)  # fewer rows than a step's new neurons: reads take rounds
    bufs = [NeuronBuffer(slots, cfg.layout, staging.np.reshape(-1)) for _ in range(cfg.n_layers)]
    caches = [NeuronCache(cfg.d_ff, slots, window=4, buffer=b) for b in bufs]
    ptrs = [b.addresses for b in bufs]
    assert (bufs[0].segments is None) == (geometry == "staged")
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, cfg.d_model)).astype(np.float16))
    with BundleReader(folder, cfg, threads=8) as reader:
        for _ in range(25):
            for layer in range(cfg.n_layers):
                hot = rng.choice(40, 8, replace=False)  # overlapping tokens, a few cold ones
                active = np.r_[hot, rng.choice(cfg.d_ff, 6, replace=False)]
                step = load_active(caches[layer], reader, layer, staging, active)
                n, res = step.n, caches[layer].resident
                assert step.read.bundles == step.new and step.read.bytes_read == step.new * cfg.layout.stride
                np.testing.assert_array_equal(bufs[layer].rows(n), packed(bundles[layer, res], cfg.layout))
                if geometry != "direct-q4":
                    up = bufs[layer].fields(n)["up"]  # (n, d_model) view, computed on in place
                    f = cfg.layout.field("up")
                    want = bundles[layer, res][:, f.offset : f.offset + f.nbytes].copy().view(np.float16)
                    np.testing.assert_allclose(np.array(x @ up.T), np.array(x) @ want.T, rtol=2e-2, atol=2e-2)
        assert reader.stats.bundles == sum(c.stats.new_neurons for c in caches)
    assert [b.addresses for b in bufs] == ptrs
    assert all(c.stats.rows_moved > 0 for c in caches)


@pytest.mark.parametrize("geometry", ["staged", "direct"])
def test_failed_read_leaves_no_garbage(direct_root, geometry):
    folder = direct_root / f"cache-corrupt-{geometry}"
    cfg, bundles = write_flash_model(folder, n_layers=1, seed=8, **GEOMETRIES[geometry])
    off = cfg.bundle_offset(0, 42)
    with open(folder / BUNDLES_FILE, "r+b") as f:
        f.seek(off)
        f.write(b"\xff\xff")
    staging = alloc_buffer(16, cfg.layout)
    buf = NeuronBuffer(16, cfg.layout, staging.np.reshape(-1))
    cache = NeuronCache(cfg.d_ff, 16, window=2, buffer=buf)
    with BundleReader(folder, cfg) as reader:
        load_active(cache, reader, 0, staging, np.array([1, 2]))
        with pytest.raises(FlashError, match="layer 0 neuron 42"):
            load_active(cache, reader, 0, staging, np.array([41, 42, 43]))
        assert cache.rows_of([41, 42, 43]).tolist() == [-1, -1, -1]  # none entered
        np.testing.assert_array_equal(buf.rows(cache.n), packed(bundles[0, cache.resident], cfg.layout))
        cache.reset()  # a new request without the bad neuron: the cache goes on working
        load_active(cache, reader, 0, staging, np.array([1, 3]))
        assert set(cache.resident.tolist()) == {1, 3}
        np.testing.assert_array_equal(buf.rows(cache.n), packed(bundles[0, cache.resident], cfg.layout))
