"""Calibration's time at a real model's geometry, measured on a few of its layers:

    python -m mlx_flash.bench --calibration opt-6.7b [--tokens 2048] [--dir DIR] [--json FILE]

Writes a random float16 OPT source at the geometry with one layer (every matrix full size),
converts it with the product's own convert, calibrates it with train_predictors at its defaults
(the built-in model's tokenizer and the shipped calibration text) at the predictor rank of most
layers and at the 4x rank of the last four, and reports the seconds per layer by phase.
Calibration runs one layer at a time, so a whole model costs each layer's time at its rank, plus
the setup measured here; the projection says so.

What is synthetic: the weights. Linear weights and embeddings are drawn as MLX initialises them,
and the fc1 biases are shifted so that about ACTIVE_SHARE of the neurons fire, as in a ReLU
model; every phase's cost depends on the shapes (tokens x d_model x d_ff, the predictor's rank),
not on the values, so the seconds are those of the real model on this machine.
"""

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..convert import convert
from ..errors import FlashError
from ..sources import copy_tokenizer, instantiate, load_tokenizer, models_dir, read_source
from ..flash.predictor import default_ranks
from ..train_predictors import DEFAULT_TOKENS, PHASES, train
from .scale import GEOMETRIES

ACTIVE_SHARE = 0.1  # neurons a token fires: OPT-6.7B's layers keep 3-10% (the paper's Figure 3)
TOKENIZER_OF = "smollm2-135m"  # whose tokenizer reads the calibration text (the geometry's vocabulary is larger)


def write_source(folder: Path, name: str, layers: int, seed: int) -> Path:
    """A float16 OPT checkpoint at the geometry, with `layers` layers, in the layout convert reads."""
    g = GEOMETRIES[name]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy_tokenizer(read_source(TOKENIZER_OF).tokenizer_dir, tmp)
    vocab = max(g.vocab, len(load_tokenizer(tmp).vocab))  # every id the tokenizer gives has a row
    config = {**g.model_config(), "num_hidden_layers": layers, "vocab_size": vocab, "torch_dtype": "float16"}
    mx.random.seed(seed)
    model = instantiate(config)
    # a LayerNorm'd input has norm ~sqrt(d): fc1 pre-activations ~ N(0, 1/3) under MLX's uniform init
    cut = math.sqrt(1 / 3) * 1.2816  # the normal's 90th percentile: ~10% above it
    for layer in model.layers:
        layer.mlp.up_proj.bias = mx.full((g.d_ff,), -cut)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def measure(name: str, tokens: int, folder: Path, seed: int = 0, quiet: bool = False) -> dict:
    """Write a one-layer source, convert it and calibrate it twice: at the rank of most layers and at
    the 4x rank of the last four (default_ranks); the seconds of each step and calibration's by phase."""
    if name not in GEOMETRIES:
        raise FlashError(f"--calibration: unknown geometry '{name}' (choose from {', '.join(GEOMETRIES)})")
    g = GEOMETRIES[name]
    source, flash = folder / "source", folder / "flash"
    need = 2 * (2 * g.d_model * g.d_ff + 4 * g.d_model ** 2) * 2 + 4 * g.vocab * g.d_model
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(folder).free < need + (1 << 30):
        raise FlashError(f"the synthetic source and its conversion need about {need / 1e9:.1f} GB free in "
                         f"{folder}: pass another --dir")
    t0 = time.perf_counter()
    write_source(source, name, 1, seed)
    t1 = time.perf_counter()
    shutil.rmtree(flash, ignore_errors=True)
    convert(str(source), flash, quiet=quiet)
    t2 = time.perf_counter()
    ranks = sorted(set(default_ranks(g.n_layers, g.d_model)))  # most layers' rank, then the last layers'
    runs = {}
    for r in ranks:
        entry = train(flash, tokens=tokens, rank=r, last_rank=r, progress=not quiet)
        seconds = entry["calibration"]["seconds"]
        runs[r] = {"per_layer_s": sum(seconds[p] for p in PHASES), "by_phase_s": {p: seconds[p] for p in PHASES},
                   "setup_s": seconds["total"] - sum(seconds[p] for p in PHASES),
                   "layers": default_ranks(g.n_layers, g.d_model).count(r)}
    setup = max(run["setup_s"] for run in runs.values())
    return {"geometry": name, "model_layers": g.n_layers, "d_model": g.d_model, "d_ff": g.d_ff,
            "tokens": entry["calibration"]["tokens"], "true_share": entry["true_share"][0],
            "write_source_s": t1 - t0, "convert_s": t2 - t1, "by_rank": runs, "setup_s": setup,
            "projected_model_s": setup + sum(run["per_layer_s"] * run["layers"] for run in runs.values())}


def print_report(r: dict):
    print(f"calibration at {r['geometry']} geometry (synthetic weights: random, ~{r['true_share']:.0%} of neurons "
          f"active), one layer of d_model {r['d_model']}, d_ff {r['d_ff']}, on {r['tokens']} tokens:")
    for rank, run in r["by_rank"].items():
        phases = ", ".join(f"{p} {s:.2f}" for p, s in run["by_phase_s"].items())
        print(f"  predictor rank {rank} ({run['layers']} of its {r['model_layers']} layers): "
              f"{run['per_layer_s']:.1f} s per layer ({phases})")
    print(f"  projected for all {r['model_layers']} layers on this machine: {r['projected_model_s'] / 60:.1f} min "
          f"({r['setup_s']:.1f} s setup + each layer at its rank; calibration runs one layer at a time)")
    print(f"  (writing the synthetic source took {r['write_source_s']:.0f} s, converting it {r['convert_s']:.0f} s)")


def setup_arg_parser():
    p = argparse.ArgumentParser(prog="python -m mlx_flash.bench --calibration",
                                description="Calibration's seconds per layer at a real geometry (synthetic weights).")
    p.add_argument("--calibration", required=True, help=f"geometry: {', '.join(GEOMETRIES)}")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens (train_predictors' default)")
    p.add_argument("--dir", default=None, help="where the source and its conversion go (default models/synthetic-calibration-GEOMETRY)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic files (default: removed at the end)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(argv) -> dict:
    args = setup_arg_parser().parse_args(argv)
    folder = Path(args.dir) if args.dir else models_dir() / f"synthetic-calibration-{args.calibration}"
    try:
        r = measure(args.calibration, args.tokens, folder, quiet=args.quiet)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print_report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    run(sys.argv[1:])
