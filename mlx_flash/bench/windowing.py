"""What windowing saves, from real activations: the paper's Figure 4, measured here.

    python -m mlx_flash.probe window --model models/smollm2-135m [--windows 1:10] [--tokens 512]
        [--source predicted|active] [--json out.json] [--plots DIR]

Per window size k, the share of the FFN read per token (the neurons new to the
window) and the share held in DRAM (the window's union): the model runs densely
over held-out text and each layer's predicted set (the trained predictors) or
true active set (the calibrated thresholds) goes through a NeuronCache without buffers.
"""

from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np

from ..errors import FlashError
from .cli import figure, write_outputs
from .probe import parse_range


def active_sets(folder: Path, tokens: int = 512, seq_len: int = 128, source: str = "predicted", text=None,
                progress: bool = False):
    """Per layer (N, d_ff) bool masks over held-out text, and the sequence length."""
    import mlx.core as mx
    from tqdm import tqdm

    from ..flash.predictor import load_predictors
    from ..flash.sparsity import HELDOUT_TEXT, active_mask, read_texts, record_layers, token_windows
    from ..format import FlashConfig
    from ..load import LayerLoader, load_resident
    from ..sources import load_tokenizer

    folder = Path(folder)
    cfg = FlashConfig.load(folder)
    if cfg.predictors is None:
        raise FlashError(f"{folder} has no predictors: run python -m mlx_flash.train_predictors --model {folder}")
    if source not in ("predicted", "active"):
        raise FlashError("--source must be 'predicted' or 'active'")
    windows = token_windows(load_tokenizer(folder), read_texts([str(text or HELDOUT_TEXT)]), tokens, seq_len)
    preds = load_predictors(mx.load(str(folder / cfg.predictors["file"])), cfg.n_layers)
    masks, pinned = [], cfg.predictors.get("pinned") or [[] for _ in range(cfg.n_layers)]
    bar = tqdm(total=cfg.n_layers, desc="dense pass over held-out text", unit="layer", disable=not progress)

    def on_layer(a):
        bar.update()
        if source == "active":
            masks.append(active_mask(a.h, cfg.predictors["activation_threshold"][a.layer]))
        else:
            z = np.array(preds[a.layer](mx.array(a.x)).astype(mx.float32))  # (N, d_ff)
            masks.append(z > cfg.predictors["tau"][a.layer])
            masks[-1][:, pinned[a.layer]] = False  # pinned neurons live outside the windows (flash.outliers)

    model, down_bias = load_resident(folder, cfg)
    loader = LayerLoader(folder, cfg, model.ffn_spec, down_bias)
    try:
        record_layers(model, windows, loader, on_layer)
    finally:
        loader.close()
        bar.close()
    return masks, windows.shape[1], cfg


def window_curve(masks: List[np.ndarray], seq_len: int, windows: Iterable[int], skip: Optional[int] = None) -> dict:
    """Share of the FFN new per token and held, per window size, through a NeuronCache (rows=None).

    Windows do not cross sequences; the first `skip` tokens of each sequence (default: the
    largest window) are left out so every window size is measured on the same tokens.
    """
    from ..flash.neuron_cache import NeuronCache

    windows = sorted(set(windows))
    if min(windows) < 1:
        raise FlashError("window sizes must be at least 1")
    skip = max(windows) if skip is None else skip
    if skip >= seq_len:
        raise FlashError(f"sequences of {seq_len} tokens are too short for windows up to {max(windows)}")
    d_ff = masks[0].shape[1]
    out = []
    for k in windows:
        new = held = count = 0
        for m in masks:
            for s in range(0, len(m) - seq_len + 1, seq_len):
                cache = NeuronCache(d_ff, d_ff, k)
                for t in range(seq_len):
                    ids, _ = cache.step(np.flatnonzero(m[s + t]))
                    cache.commit()
                    if t >= skip:
                        new += len(ids)
                        held += cache.n
                        count += 1
        out.append({"window": k, "new_share": new / count / d_ff, "held_share": held / count / d_ff})
    predicted = float(np.mean([m.mean() for m in masks]))
    return {"predicted_share": predicted, "points": out, "tokens_measured_per_layer": count // len(masks)}


def plot_window(curve: dict, path: Path, source: str = "predicted"):
    ks = [p["window"] for p in curve["points"]]
    with figure(path, "Sliding window: loaded vs held neurons (paper Fig. 4)", "share of the FFN (%)",
                "window size (tokens)") as ax:
        ax.plot(ks, [100 * p["new_share"] for p in curve["points"]], marker="o", label="new per token (read)")
        ax.plot(ks, [100 * p["held_share"] for p in curve["points"]], marker="s", label="held in the window (DRAM)")
        ax.axhline(100 * curve["predicted_share"], ls="--", c="gray", lw=1, label=f"{source} per token")


def add_parser(sub):
    w = sub.add_parser("window", help="FFN share read and held against the window size")
    w.add_argument("--model", "-M", required=True, help="converted model folder with trained predictors")
    w.add_argument("--windows", default="1:10", help="window sizes: lo:hi or a,b,c")
    w.add_argument("--tokens", type=int, default=512, help="held-out tokens to run densely")
    w.add_argument("--seq-len", type=int, default=128)
    w.add_argument("--source", choices=["predicted", "active"], default="predicted")
    w.add_argument("--text", default=None, help="held-out text (default: mlx_flash/data/heldout.txt)")
    return w


def run(args) -> dict:
    """`probe window`: the table, and the figure with --plots."""
    masks, seq_len, cfg = active_sets(Path(args.model), args.tokens, args.seq_len, args.source, args.text,
                                      progress=not args.quiet)
    r = window_curve(masks, seq_len, parse_range(args.windows))
    r.update(source=args.source, model=str(args.model), tokens=args.tokens, seq_len=seq_len)
    print(f"{args.source} sets over {args.tokens} held-out tokens; {r['predicted_share']:.1%} of the FFN "
          f"per token; {r['tokens_measured_per_layer']} tokens per layer measured")
    print("| window | new per token | held |")
    print("| --- | --- | --- |")
    for p in r["points"]:
        print(f"| {p['window']} | {p['new_share']:.2%} | {p['held_share']:.2%} |")
    write_outputs(r, args.json, args.plots, lambda d: plot_window(r, d / "windowing.png", args.source))
    return r
