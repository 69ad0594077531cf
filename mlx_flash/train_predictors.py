"""Calibrate sparsity and train the activation predictors of a converted model.

    python -m mlx_flash.train_predictors --model models/smollm2-135m [--text FILE ...]
        [--sparsity 0.5] [--rank R --last-layers-rank R2 --epochs E] [--window K] [--dram-budget 8G]

Runs the model densely over calibration text (the text shipped in the package
unless --text is given; `hf://datasets/<repo>/<file>` fetches one from the Hub),
cut into sequences that begin as prompts do (paragraph starts, and chats when the
tokenizer has a template: sparsity.start_sequences), calibrates one activation
threshold per layer (0 for ReLU models), finds the outlier neurons to pin in DRAM
(flash.outliers), trains one low-rank predictor per layer for the others (loss
weighted by what a miss costs, --weight), sizes the neuron windows from the
predicted sets, and stores it all in the model folder (predictors.safetensors +
flash.json).
It works one layer at a time (sparsity.record_layers): memory holds the resident
part, one layer's bundles and that layer's activations, so a model bigger than
memory can be calibrated; --dram-budget is checked against that up front.
At the end it says where the time went, in seconds per layer and phase (PHASES).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .errors import FlashError, cli
from .flash.budget import CALIBRATION_CHUNK, calibration_tokens, returning_freed_memory
from .flash.outliers import DEFAULT_MAX_PER_LAYER, DEFAULT_RATIO, pinned_neurons, ratios
from .flash.predictor import LOOKAHEAD, default_ranks, save_predictors, train_layer, window_union_p99
from .flash.sparsity import (
    LayerActivations,
    active_mask,
    down_norms,
    is_relu,
    read_texts,
    record_layers,
    has_chat_template,
    start_sequences,
    threshold,
)
from .format import CONFIG_FILE, FlashConfig
from .load import LayerLoader, is_flash_folder, load_resident
from .sources import load_tokenizer

PREDICTORS_FILE = "predictors.safetensors"
DEFAULT_SPARSITY = 0.5  # non-ReLU models; chosen from measured perplexity (README, "Quality")
DEFAULT_WINDOW = 5  # the paper's k
DEFAULT_TOKENS = 2048  # SmolLM2-135M: ~25 s on 2 x86 cores (numpy on MLX's CPU backend: flash.predictor)
DEFAULT_RECALL = 0.98  # measured: dense's greedy decoding reproduced (README, "Quality"); 0.95 parted at token 23
DEFAULT_SEQ_LEN = 128  # every sequence starts like a prompt: 16 starts in the default 2,048 tokens
DEFAULT_WEIGHT = "contribution"
# where calibration's time goes, per layer: reading the layer and running the model up to its FFN, the
# activation threshold and contributions, the outlier neurons, the predictor, its recall levels, window sizes
PHASES = ("model pass", "thresholds", "pinning", "training", "levels", "windows")


def fetch_hub_text(spec: str) -> str:
    """hf://datasets/<org>/<name>/<path in repo> -> a local file."""
    from huggingface_hub import hf_hub_download

    parts = spec[len("hf://datasets/"):].split("/", 2)
    if len(parts) != 3:
        raise FlashError(f"{spec}: expected hf://datasets/<org>/<name>/<file>")
    try:
        return hf_hub_download(f"{parts[0]}/{parts[1]}", parts[2], repo_type="dataset")
    except Exception as e:
        raise FlashError(f"cannot download {spec}: {str(e).splitlines()[0]}")


def train(folder, texts=None, sparsity=DEFAULT_SPARSITY, rank=None, last_rank=None, epochs=8,
          tokens=None, seq_len=DEFAULT_SEQ_LEN, window=DEFAULT_WINDOW, target_recall=DEFAULT_RECALL,
          dram_budget=None, lookahead=False, progress=True, weight=DEFAULT_WEIGHT, pin_ratio=DEFAULT_RATIO,
          pin_max=DEFAULT_MAX_PER_LAYER) -> dict:
    """Calibrate and train, one layer at a time; returns the `predictors` entry written to flash.json.

    tokens: calibration tokens (default DEFAULT_TOKENS, or fewer if `dram_budget` holds only fewer).
    lookahead: also train, for every layer l > 0, a predictor of its active neurons from layer
    l-1's FFN input (flash.prefetch reads them while layer l-1 computes).
    weight: "contribution" (a positive's loss weighs what its miss costs) or "count".
    pin_ratio, pin_max: the outlier rule (flash.outliers); pin_max=0 pins nothing.
    Memory: the resident part, one layer's bundles and that layer's activations (record_layers)."""
    start = time.perf_counter()
    folder = Path(folder)
    if not is_flash_folder(folder):
        raise FlashError(f"{folder} is not a converted flash model: run python -m mlx_flash.convert first")
    if not 0 < sparsity < 1:
        raise FlashError("--sparsity must be between 0 and 1")
    texts = [fetch_hub_text(t) if t.startswith("hf://datasets/") else t for t in (texts or [])]
    cfg = FlashConfig.load(folder)
    cfg.check_files(folder)
    ranks = default_ranks(cfg.n_layers, cfg.d_model, rank, last_rank)
    tokens = calibration_tokens(folder, cfg, ranks, tokens, DEFAULT_TOKENS, seq_len, dram_budget)
    tokenizer = load_tokenizer(folder)
    windows = start_sequences(tokenizer, read_texts(texts), max(1, tokens // seq_len), seq_len)
    model, down_bias = load_resident(folder, cfg)
    loader = LayerLoader(folder, cfg, model.ffn_spec, down_bias)
    ts, predictors, tables, pins, evidence = [], [], [], [], []
    looks, look_tables = [None], [None]  # layer 0 has no layer before it
    seconds = dict.fromkeys(PHASES, 0.0)
    bar = tqdm(total=cfg.n_layers, desc=f"calibrating and training predictors on {windows.size} tokens",
               unit="layer", disable=not progress)
    clock = [0.0]  # when the phase being timed began

    def lap(phase: str):
        now = time.perf_counter()
        seconds[phase] += now - clock[0]
        clock[0] = now

    def on_layer(a: LayerActivations):
        """Layer l's threshold, predictor and window sizes, while its activations are at hand."""
        lap("model pass")
        ts.append(threshold(a.h, cfg.activation, sparsity))
        contribution = a.h.astype(np.float32) * down_norms(a.ffn, cfg.d_ff)  # (N, d_ff) |h_tj| * ||down_j||
        active = active_mask(a.h, ts[-1])
        lap("thresholds")
        largest = np.where(active, contribution, 0).max(axis=0)
        pins.append(pinned_neurons(largest, pin_ratio, pin_max))
        evidence.append(ratios(largest))
        covered = np.square(contribution[:, pins[-1]] * active[:, pins[-1]]).sum(axis=1)  # (N,)
        active[:, pins[-1]] = False  # pinned neurons are computed every token: not the predictor's to find
        lap("pinning")
        p, by_recall = train_layer(a.x, active, ranks[a.layer], epochs=epochs, target_recall=target_recall,
                                   contribution=contribution, weight=weight, covered=covered, seconds=seconds)
        clock[0] = time.perf_counter()  # train_layer counted its own
        reports = list(by_recall.values())
        for r, union in zip(reports, window_union_p99(p, a.x, [r.tau for r in reports], window, a.seq_len)):
            r.union_p99 = union  # neurons a window of `window` tokens holds at this threshold
        p.set_dtype(mx.float16)  # as stored: half the memory while the other layers train
        predictors.append(p)
        tables.append(by_recall)
        lap("windows")
        if lookahead and a.prev_x is not None:  # the same targets, from the layer before's input
            q, by_recall_q = train_layer(a.prev_x, active, ranks[a.layer], epochs=epochs,
                                         target_recall=target_recall, contribution=contribution, weight=weight,
                                         covered=covered, seconds=seconds)
            q.set_dtype(mx.float16)
            looks.append(q)
            look_tables.append(by_recall_q)
            clock[0] = time.perf_counter()
        r = by_recall[target_recall]
        bar.set_postfix(recall=f"{r.recall:.3f}", predicted=f"{r.predicted_share:.2f}",
                        s_per_layer=f"{sum(seconds.values()) / len(ts):.2f}")
        bar.update()

    clock[0] = time.perf_counter()
    try:
        with returning_freed_memory(dram_budget is not None):
            record_layers(model, windows, loader, on_layer, CALIBRATION_CHUNK)
    finally:
        loader.close()
        bar.close()
    total = time.perf_counter() - start
    if progress:
        print(timing_line(seconds, cfg.n_layers, total), file=sys.stderr)
    reports = [t[target_recall] for t in tables]
    union_p99 = [r.union_p99 for r in reports]
    levels = {str(k): {"tau": [t[k].tau for t in tables], "recall": [t[k].recall for t in tables],
                       "contribution_recall": [t[k].contribution_recall for t in tables],
                       "predicted_share": [t[k].predicted_share for t in tables],
                       "window_union_p99": [t[k].union_p99 for t in tables]} for k in tables[0]}

    entry = {
        "file": PREDICTORS_FILE,
        "kind": "relu" if is_relu(cfg.activation) else "threshold",
        "sparsity_target": None if is_relu(cfg.activation) else sparsity,
        "activation_threshold": ts,
        "tau": [r.tau for r in reports],
        "rank": ranks,
        "target_recall": target_recall,
        "recall": [r.recall for r in reports],
        "contribution_recall": [r.contribution_recall for r in reports],
        "weight": weight,
        "precision": [r.precision for r in reports],
        "predicted_share": [r.predicted_share for r in reports],
        "true_share": [r.true_share for r in reports],
        "window": window,
        "window_union_p99": union_p99,
        "recall_levels": levels,
        "calibration": {"tokens": int(windows.size), "seq_len": seq_len, "sequences": len(windows),
                        "starts": "paragraph starts" + (", every other one as a chat" if
                                                        has_chat_template(tokenizer) else ""),
                        "texts": [str(t) for t in texts] or ["mlx_flash/data/calibration.txt"],
                        # where the time went on the machine that calibrated: all layers, by phase
                        "seconds": {"total": round(total, 2), **{k: round(v, 2) for k, v in seconds.items()}}},
        "pinned": pins,
        "pin_rule": {"ratio": pin_ratio, "max_per_layer": pin_max, "largest_ratios": evidence},
        "lookahead": lookahead_entry(look_tables, target_recall) if lookahead and cfg.n_layers > 1 else None,
    }
    tmp = folder / ("tmp-" + PREDICTORS_FILE)
    mx.save_safetensors(str(tmp), {**save_predictors(predictors), **save_predictors(looks, LOOKAHEAD)})
    os.replace(tmp, folder / PREDICTORS_FILE)
    cfg.predictors = entry
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg.to_json(), indent=1))
    os.replace(tmp, folder / CONFIG_FILE)
    return entry


def timing_line(seconds: dict, n_layers: int, total: float) -> str:
    """Where calibration's time went: seconds per layer, by phase, and the rest (loading the tokenizer
    and the resident part, cutting the text into sequences)."""
    per_layer = sum(seconds.values()) / n_layers
    parts = ", ".join(f"{k} {v / n_layers:.2f}" for k, v in seconds.items())
    return (f"calibration took {total:.1f} s: {per_layer:.2f} s per layer ({parts}), "
            f"{total - per_layer * n_layers:.1f} s setup (tokenizer, text, resident weights)")


def lookahead_entry(tables: list, target_recall: float) -> dict:
    """flash.json's record of the lookahead predictors: per layer (None at layer 0) and recall level,
    the threshold and what it costs, measured on held-out calibration tokens like the others'."""
    col = lambda k, key: [None if t is None else getattr(t[k], key) for t in tables]
    levels = {str(k): {key: col(k, key) for key in ("tau", "recall", "precision", "predicted_share")}
              for k in tables[1]}
    return {"prefix": LOOKAHEAD, "target_recall": target_recall, **levels[str(target_recall)],
            "recall_levels": levels}


def print_report(entry: dict, d_ff: int, bundle_bytes: int):
    """Per layer: what the predictor costs and covers, and the pinned outlier neurons."""
    pins = entry.get("pinned") or [[] for _ in entry["rank"]]
    print(f"{'layer':>5} {'rank':>5} {'true':>7} {'pred':>7} {'recall':>7} {'energy':>7} {'prec':>7} {'window':>7}"
          f"  pinned")
    for l in range(len(entry["rank"])):
        pinned = f"  {len(pins[l])} ({len(pins[l]) * bundle_bytes / 1e3:.1f} kB): {pins[l]}" if pins[l] else ""
        print(f"{l:>5} {entry['rank'][l]:>5} {entry['true_share'][l]:>7.3f} {entry['predicted_share'][l]:>7.3f} "
              f"{entry['recall'][l]:>7.3f} {entry['contribution_recall'][l]:>7.3f} {entry['precision'][l]:>7.3f} "
              f"{entry['window_union_p99'][l] / d_ff:>7.3f}{pinned}")
    mean = lambda k: float(np.mean(entry[k]))
    print(f"{'mean':>5} {'':>5} {mean('true_share'):>7.3f} {mean('predicted_share'):>7.3f} "
          f"{mean('recall'):>7.3f} {mean('contribution_recall'):>7.3f} {mean('precision'):>7.3f} "
          f"{np.mean(entry['window_union_p99']) / d_ff:>7.3f}")
    print("true/pred: share of the FFN active/predicted per token; recall: share of the active neurons "
          "predicted; energy: share of the FFN output's energy predicted or pinned (contribution recall); "
          f"window: share held by a window of {entry['window']} tokens (99th percentile)")
    n = sum(map(len, pins))
    rule = entry.get("pin_rule") or {}
    print(f"pinned in DRAM: {n} outlier neurons, {n * bundle_bytes / 1e3:.1f} kB (rule: largest contribution >= "
          f"{rule.get('ratio')}x the layer's median, at most {rule.get('max_per_layer')} per layer)")
    look = entry.get("lookahead")
    if look:
        got = lambda k: float(np.mean([v for v in look[k] if v is not None]))
        print(f"lookahead predictors (layer l from layer l-1's input), layers 1+: recall {got('recall'):.3f}, "
              f"precision {got('precision'):.3f}, predicted {got('predicted_share'):.3f} of the FFN")


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Calibrate sparsity and train activation predictors.")
    p.add_argument("--model", "-M", required=True, help="converted flash model folder")
    p.add_argument("--dram-budget", default=None,
                   help="memory calibration may use (e.g. 8G, or a share of the model: 0.5, 60%%): checked "
                        "up front; a budget too small for the default --tokens calibrates on fewer")
    p.add_argument("--text", nargs="*", default=None,
                   help="calibration text files (default: the text shipped in mlx_flash/data)")
    p.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY,
                   help="target sparsity of non-ReLU models (ReLU models use activation > 0)")
    p.add_argument("--rank", type=int, default=None, help="predictor rank (default: 128, or d_model/4)")
    p.add_argument("--last-layers-rank", type=int, default=None, help="rank of the last 4 layers (default 4x)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--tokens", type=int, default=None,
                   help=f"calibration tokens (default {DEFAULT_TOKENS}, or what --dram-budget leaves room for)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help="tokens per calibration sequence; each starts like a prompt (a paragraph or a chat)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="window k used to size the neuron caches")
    p.add_argument("--lookahead", action="store_true",
                   help="also train lookahead predictors (layer l's neurons from layer l-1's input) for "
                        "generate --prefetch")
    p.add_argument("--target-recall", type=float, default=DEFAULT_RECALL)
    p.add_argument("--weight", choices=["contribution", "count"], default=DEFAULT_WEIGHT,
                   help="weigh each missed neuron in the training loss by its contribution |h| * ||down|| "
                        "(default) or count every neuron alike")
    p.add_argument("--pin-ratio", type=float, default=DEFAULT_RATIO,
                   help="pin a neuron in DRAM when its largest contribution is this many times its layer's "
                        "median (mlx_flash.flash.outliers)")
    p.add_argument("--pin-max", type=int, default=DEFAULT_MAX_PER_LAYER,
                   help="at most this many pinned neurons per layer (0: pin none)")
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    entry = train(args.model, args.text, args.sparsity, args.rank, args.last_layers_rank, args.epochs,
                  args.tokens, args.seq_len, args.window, args.target_recall, args.dram_budget, args.lookahead,
                  weight=args.weight, pin_ratio=args.pin_ratio, pin_max=args.pin_max)
    cfg = FlashConfig.load(Path(args.model))
    print_report(entry, cfg.d_ff, cfg.layout.field_bytes)
    print(f"predictors written to {Path(args.model) / PREDICTORS_FILE}")


if __name__ == "__main__":
    main()
