"""The synthetic model of same-budget mode: a quantized OPT folder with random weights, and predictors
whose cost is real but whose active sets come from bench.scale's ActivationProcess (see
mlx_flash.bench.same_budget for what is synthetic and why).

- `write_model`: flash.json + resident.safetensors + ffn.bundles in the layout `convert --quantize`
  writes, plus flash.json's `predictors` facts (share predicted, window union) from the process;
- `SyntheticPredictor`, `SyntheticLookahead`: nn.Modules (their bytes are planned) that compute a
  rank-128 8-bit low-rank product on the FFN input and name the process's neurons;
"""

import math
import shutil
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import FlashError
from ..format import BUNDLES_FILE, PAGE, RESIDENT_FILE, BundleLayout, FlashConfig, round_up
from ..models.in_out import LAYOUT_KEY, in_out_paths, tied, to_in_out
from .scale import GEOMETRIES as SCALE_GEOMETRIES
from .scale import ActivationProcess, Geometry, write_bundles

PREDICTOR_RANK = 128  # the paper's (its last 4 layers: 1024); at most d_model / 8 (the test geometry)
# the tests': FFN-heavy enough that the baselines stream at a budget flash fits
GEOMETRIES = {**SCALE_GEOMETRIES, "tiny-ffn": Geometry("tiny-ffn", 4, 256, 1024, 256, 64, 4)}


# MARK: - the synthetic folder


def model_config(g: Geometry, layers: int, bits: int, group: int) -> dict:
    return {**g.model_config(), "num_hidden_layers": layers, "quantization": {"group_size": group, "bits": bits}}


def random_resident(config: dict, bits: int, group: int, seed: int, layout: str) -> Dict[str, mx.array]:
    """The resident weights `convert --quantize bits --resident-layout layout` keeps (every matrix but
    the FFN's quantized, float16 biases and positions' scales, float32 norm weights), random: the
    quantized values uniform, scales and biases such that each matrix is zero-mean with std ~
    1/sqrt(d_model). Records the in-out modules in config's quantization entry, as convert does."""
    from mlx.utils import tree_flatten

    from ..sources import instantiate

    model = instantiate(config)  # its float weights stay lazy: never evaluated
    for layer in model.layers:
        layer.mlp = nn.Module()
    if layout == "in-out":
        paths = in_out_paths(model, tied(model), group)
        to_in_out(model, paths, group, bits)
        config["quantization"][LAYOUT_KEY] = paths
    nn.quantize(model, group, bits, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % group == 0)
    rng = np.random.default_rng(seed)
    scale = 1.0 / (math.sqrt(config["hidden_size"]) * 2 ** (bits - 1))
    out = {}
    for k, v in tree_flatten(model.parameters()):
        if v.dtype == mx.uint32:
            out[k] = mx.array(rng.integers(0, 1 << 32, v.shape, dtype=np.uint32))
        elif k.endswith("scales"):
            out[k] = mx.full(v.shape, scale, mx.float16)
        elif k.endswith(".biases"):
            out[k] = mx.full(v.shape, -scale * (2 ** bits - 1) / 2, mx.float16)
        elif k.endswith("norm.weight"):
            out[k] = mx.ones(v.shape)
        else:  # linear biases, norm biases
            out[k] = mx.zeros(v.shape, mx.float16)
    for l in range(config["num_hidden_layers"]):
        out[f"model.decoder.layers.{l}.mlp.down_proj.bias"] = mx.zeros((config["hidden_size"],), mx.float16)
    return out


def write_model(folder: Path, g: Geometry, layers: int, bits: int, group: int, seed: int = 0,
                progress: bool = True, resident_layout: str = "out-in") -> FlashConfig:
    """flash.json + resident.safetensors + ffn.bundles of a synthetic quantized OPT, written atomically
    (reused when the folder already holds this geometry and resident layout)."""

    folder = Path(folder)
    want = {"synthetic": g.name, "layers": layers, "bits": bits, "group_size": group, "seed": seed,
            "resident_layout": resident_layout}
    try:
        cfg = FlashConfig.load(folder)
        cfg.check_files(folder)
        stored = "in-out" if cfg.model_config["quantization"].get(LAYOUT_KEY) else "out-in"
        if {k: cfg.source.get(k) for k in want} == want and stored == resident_layout:
            return cfg
    except FlashError:
        pass
    if g.d_model % group:
        raise FlashError(f"--bits/--group: d_model {g.d_model} is not a multiple of the group size {group}")
    quant = {"bits": bits, "group_size": group}
    layout = BundleLayout.build(g.d_model, g.glu, g.bias, "float16", quant)
    size = layers * round_up(g.d_ff * layout.stride, PAGE)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(folder.parent).free < 2 * size + (1 << 30):
        raise FlashError(f"the synthetic model needs about {2 * size / 1e9:.1f} GB free in {folder.parent}: "
                         f"pass fewer --layers or another --dir")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # random fp16 bit patterns: finite scales and biases, any quantized weights
    infos, off = write_bundles(tmp / BUNDLES_FILE, seed, layers, g.d_ff, layout,
                               f"writing synthetic {g.name} q{bits} FFN", progress)
    config = model_config(g, layers, bits, group)
    mx.save_safetensors(str(tmp / RESIDENT_FILE), random_resident(config, bits, group, seed, resident_layout))
    cfg = FlashConfig(architecture="opt", model_config=config, d_model=g.d_model, d_ff=g.d_ff, n_layers=layers,
                      glu=g.glu, bias=g.bias, activation="relu", dtype="float16", quantization=quant, layout=layout,
                      layers=infos, file_size=off,
                      source={**want, "note": "random weights (mlx_flash.bench.same_budget)"})
    cfg.predictors = process_facts(cfg, seed)
    cfg.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return cfg


def process_facts(cfg: FlashConfig, seed: int, tokens: int = 48, warmup: int = 8) -> dict:
    """flash.json's `predictors` entry for the synthetic sets, what flash.budget.plan sizes the windows
    from: share predicted per layer and the 99th percentile of a window's union (ActivationProcess
    replayed through NeuronCaches)."""
    from ..flash.neuron_cache import NeuronCache

    proc = ActivationProcess(cfg.d_ff, cfg.n_layers, seed=seed)
    caches = [NeuronCache(cfg.d_ff, cfg.d_ff, proc.window) for _ in range(cfg.n_layers)]
    held = np.zeros((tokens, cfg.n_layers))
    for t in range(warmup + tokens):
        for l, (c, ids) in enumerate(zip(caches, proc.step())):
            c.step(ids)
            c.commit()
            if t >= warmup:
                held[t - warmup, l] = c.n
    L = cfg.n_layers
    return {"synthetic": True, "window": proc.window, "target_recall": 1.0, "tau": [0.0] * L,
            "predicted_share": [float(p) for p in proc.pi.mean(axis=1)],
            "window_union_p99": [float(v) for v in np.percentile(held, 99, axis=0)], "process": proc.expected}


# MARK: - synthetic predictors: real cost, sets from the activation process


class ActiveSets:
    """This forward pass's predicted sets, per token one per layer; layer 0's predictor steps the
    process once per token (a prompt's tokens follow one another as decoded ones do)."""

    def __init__(self, d_ff: int, n_layers: int, seed: int):
        self.proc = ActivationProcess(d_ff, n_layers, seed=seed)
        self.sets: List[np.ndarray] = []  # the last token's, per layer
        self.tokens: List[List[np.ndarray]] = []  # every token's of this pass, per token per layer

    def step(self, n: int):
        self.tokens = [self.proc.step() for _ in range(n)]
        self.sets = self.tokens[-1]

    def scores(self, layer: int, ids: np.ndarray) -> mx.array:
        s = np.full(self.proc.d_ff, -1.0, np.float32)
        s[ids] = 1.0
        return mx.array(s)

    def all_scores(self, layer: int) -> mx.array:
        """(N, d_ff): > 0 exactly on each token's set of this layer."""
        s = np.full((len(self.tokens), self.proc.d_ff), -1.0, np.float32)
        for t, sets in enumerate(self.tokens):
            s[t, sets[layer]] = 1.0
        return mx.array(s)


class LowRank(nn.Module):
    """A predictor's shape and cost: d_model -> rank -> d_ff, 8-bit like trained_predictors in memory."""

    def __init__(self, d_model: int, d_ff: int, rank: int):
        super().__init__()
        self.a = nn.Linear(d_model, rank, bias=False)
        self.b = nn.Linear(rank, d_ff)
        nn.quantize(self, 32, 8, class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0)
        mx.eval(self.parameters())

    def __call__(self, x: mx.array) -> mx.array:
        return self.b(self.a(x))


class SyntheticPredictor(nn.Module):
    """Scores (N, d_ff), > 0 exactly for the process's set of this layer; the low-rank product is
    computed and added at zero weight, so MLX computes it before the scores can be read."""

    def __init__(self, layer: int, sets: ActiveSets, d_model: int, rank: int):
        super().__init__()
        self.layer, self._sets = layer, sets
        self.net = LowRank(d_model, sets.proc.d_ff, rank)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        if self.layer == 0:
            self._sets.step(x.shape[0])
        return self._sets.all_scores(self.layer) + 0 * self.net(x)


class SyntheticLookahead(SyntheticPredictor):
    """Layer `layer`'s neurons from the layer before's input: of the neurons it will need that are not in
    its window (`window()`: that layer's NeuronCache, set after attaching), each named with probability
    `hit`; plus neurons it will not need, `waste` of those named."""

    def __init__(self, layer: int, sets: ActiveSets, d_model: int, rank: int, hit: float, waste: float,
                 seed: int):
        super().__init__(layer, sets, d_model, rank)
        self.hit, self.waste = hit, waste
        self._rng = np.random.default_rng(seed + 1000 + layer)
        self.window = None  # a function, not a module: the layer's weights are not the predictor's

    def __call__(self, x: mx.array) -> mx.array:
        need = self._sets.sets[self.layer]
        absent = self.window().neuron_to_slot < 0  # (d_ff,) not in the window
        new = need[absent[need]]
        named = new[self._rng.random(len(new)) < self.hit]
        n_wrong = int(round(len(named) * self.waste / (1 - self.waste))) if self.waste < 1 else 0
        absent[need] = False
        pool = np.flatnonzero(absent)
        wrong = self._rng.choice(pool, min(n_wrong, len(pool)), replace=False)
        return self._sets.scores(self.layer, np.concatenate([named, wrong])) + 0 * self.net(x)
