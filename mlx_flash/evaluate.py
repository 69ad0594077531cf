"""Quality of flash mode against dense: perplexity and greedy-token agreement on held-out text.

    python -m mlx_flash.evaluate --model models/smollm2-135m [--text FILE] [--tokens 256] [--mode both]
    python -m mlx_flash.evaluate --model smollm2-135m   (a built-in name: prepared once, then reused)

Flash mode is evaluated the way it generates: one token at a time with a KV
cache, so the neuron windows slide exactly as in generation (teacher forcing:
the next input is the text's token, not the model's). Agreement is the share
of positions where flash's most likely next token is dense's.
"""

import argparse
import json
import math
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from tqdm import tqdm

from .errors import FlashError, cli
from .flash.budget import DEFAULT_MAX_KV_SIZE
from .flash.sparsity import HELDOUT_TEXT, encode_long
from .load import is_flash_folder, load_flash
from .prepare import model_for
from .sources import load_tokenizer, resolve

DEFAULT_TOKENS = 256
DEFAULT_OFFSET = 1000  # skip the text's first tokens (titles, chapter headings)


def text_tokens(tokenizer, path, n: int, offset: int = DEFAULT_OFFSET) -> np.ndarray:
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError as e:
        raise FlashError(f"cannot read {path}: {e.strerror}")
    ids = np.array(encode_long(tokenizer, text), dtype=np.int32)
    offset = min(offset, max(0, len(ids) - n - 1))
    if len(ids) - offset < n + 1:
        raise FlashError(f"{path} has {len(ids)} tokens, fewer than --tokens {n} + 1")
    return ids[offset : offset + n + 1]


def dense_logprobs(model, ids: np.ndarray, chunk: int = 128) -> np.ndarray:
    """(n, vocab) log-probabilities of the next token at each of the first n positions."""
    cache = make_prompt_cache(model)
    out = []
    for i in range(0, len(ids) - 1, chunk):
        logits = model(mx.array(ids[i : min(i + chunk, len(ids) - 1)])[None], cache=cache)[0]
        out.append(np.array((logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(mx.float32)))
    return np.concatenate(out)


def stepwise_logprobs(model, ids: np.ndarray, progress: bool = True) -> np.ndarray:
    """Like dense_logprobs, one token per forward pass (how flash mode generates)."""
    cache = make_prompt_cache(model)
    out = []
    for t in tqdm(range(len(ids) - 1), desc="flash, token by token", unit="tok", disable=not progress):
        logits = model(mx.array(ids[t : t + 1])[None], cache=cache)[0]
        out.append(np.array((logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(mx.float32)))
    return np.concatenate(out)


def perplexity(logprobs: np.ndarray, ids: np.ndarray) -> float:
    nll = -logprobs[np.arange(len(logprobs)), ids[1 : len(logprobs) + 1]]
    return float(math.exp(nll.mean()))


def evaluate(folder, text=None, tokens: int = DEFAULT_TOKENS, mode: str = "both", progress=True,
             configs=None, **flash_options):
    """Returns {"dense": {...}, "flash": [{...}, ...]}: perplexity, agreement and flash statistics.

    configs: flash option dicts to evaluate one after another (default: one, `flash_options`).
    """
    folder = resolve(model_for(str(folder)))  # a built-in name: its converted, calibrated copy
    if not is_flash_folder(folder):
        raise FlashError(f"{folder} is not a converted flash model: run python -m mlx_flash.convert first")
    tokenizer = load_tokenizer(folder)
    ids = text_tokens(tokenizer, text or HELDOUT_TEXT, tokens)
    result = {"tokens": tokens, "text": str(text or "mlx_flash/data/heldout.txt"), "flash": []}
    dense_lp = None
    if mode in ("dense", "both"):
        model, _ = load_flash(folder, "dense")
        t0 = time.perf_counter()
        dense_lp = dense_logprobs(model, ids)
        result["dense"] = {"perplexity": perplexity(dense_lp, ids), "seconds": time.perf_counter() - t0}
        del model
    if mode in ("flash", "both"):
        for opts in configs or [flash_options]:
            opts = {"max_kv_size": max(DEFAULT_MAX_KV_SIZE, tokens + 1), **opts}  # the text fits the context
            model, cfg = load_flash(folder, "flash", **opts)
            t0 = time.perf_counter()
            lp = stepwise_logprobs(model, ids, progress)
            level = opts.get("recall") or cfg.predictors["target_recall"]
            r = {"options": opts, "recall": level, "window": model.flash_plan.window,
                 "sparsity_target": cfg.predictors.get("sparsity_target"),
                 "perplexity": perplexity(lp, ids), "seconds": time.perf_counter() - t0,
                 "stats": model.flash_stats.snapshot(), "plan": model.flash_plan.to_dict()}
            if dense_lp is not None:
                r["agreement"] = float((lp.argmax(-1) == dense_lp.argmax(-1)).mean())
                r["perplexity_vs_dense"] = r["perplexity"] / result["dense"]["perplexity"] - 1
            result["flash"].append(r)
            model.flash_reader.close()
            del model
    return result


def markdown(r: dict) -> str:
    """The README's quality table."""
    rows = ["| mode | sparsity | recall | window | FFN predicted | FFN held | FFN read | MB read/token | "
            "perplexity | vs dense | greedy agreement |", "|" + " --- |" * 11]
    if "dense" in r:
        rows.append(f"| dense | - | - | - | 100% | 100% | 0% | 0 | {r['dense']['perplexity']:.3f} | - | - |")
    for f in r["flash"]:
        s = f["stats"]
        sp = f"{f['sparsity_target']:.0%}" if f["sparsity_target"] else "ReLU"
        vs = f"{f['perplexity_vs_dense']:+.1%}" if "perplexity_vs_dense" in f else "-"
        ag = f"{f['agreement']:.1%}" if "agreement" in f else "-"
        rows.append(f"| flash | {sp} | {f['recall']} | {f['window']} | {s['ffn_share_predicted']:.1%} | "
                    f"{s['ffn_share_resident']:.1%} | {s['ffn_share_read']:.1%} | "
                    f"{s['bytes_read_per_token'] / 1e6:.2f} | {f['perplexity']:.3f} | {vs} | {ag} |")
    return "\n".join(rows)


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Perplexity and agreement of flash mode against dense.")
    p.add_argument("--model", "-M", required=True,
                   help="converted flash model folder, or a built-in name (converted and calibrated on first use)")
    p.add_argument("--text", default=None, help="held-out text file (default: mlx_flash/data/heldout.txt)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    p.add_argument("--mode", choices=["dense", "flash", "both"], default="both")
    p.add_argument("--dram-budget", default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--recall", type=float, nargs="*", default=None,
                   help="predictor recall levels to evaluate, one flash run each (default: the calibrated one)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.tokens < 2:
        raise FlashError("--tokens must be at least 2")
    base = {k: v for k, v in {"dram_budget": args.dram_budget, "window": args.window}.items() if v is not None}
    configs = [dict(base, recall=r) for r in args.recall] if args.recall else [base]
    r = evaluate(args.model, args.text, args.tokens, args.mode, configs=configs)
    print(f"held-out text: {r['text']}, {r['tokens']} tokens, one token per forward pass in flash mode")
    print(markdown(r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=1)


if __name__ == "__main__":
    main()
