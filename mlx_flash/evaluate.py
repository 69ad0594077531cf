"""Quality of flash mode against dense: how close its answers are, on held-out text and prompts.

    python -m mlx_flash.evaluate --model models/smollm2-135m [--text FILE] [--tokens 256] [--mode both]
        [--recall 0.9 0.95] [--starts 8] [--greedy 32]
    python -m mlx_flash.evaluate --model smollm2-135m   (a built-in name: prepared once, then reused)

Flash mode is evaluated the way it generates: one token at a time with a KV
cache, so the neuron windows slide exactly as in generation (teacher forcing:
the next input is the text's token, not the model's). Per recall level:
- on `--tokens` of held-out text (from a fresh cache, as a long prompt), and on
  `--starts` sequences that begin as prompts do (paragraph starts and chats, where
  massive activations fire): perplexity against dense, greedy agreement (the share
  of positions where flash's most likely next token is dense's) and the mean
  KL(dense || flash) per token, the first tokens' apart;
- the FFN layer whose output strays furthest from dense's on the same input
  (mean relative error), which finds a missed neuron's layer, and the share of the FFN truly
  active per token (not zero, in a ReLU-family model) beside the share flash predicts;
- `--greedy` tokens decoded greedily from a few plain and chat prompts: identical
  to dense's, or where they part and by what margin dense chose there.
"""

import argparse
import json
import math
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from tqdm import tqdm

from .errors import FlashError, cli
from .flash.budget import DEFAULT_MAX_KV_SIZE
from .flash.sparsity import HELDOUT_TEXT, chat_ids, encode_long, has_chat_template, read_texts, start_sequences
from .format import FlashConfig
from .load import is_flash_folder, load_flash
from .prepare import model_for
from .sources import load_tokenizer, resolve

DEFAULT_TOKENS = 256
DEFAULT_OFFSET = 1000  # skip the text's first tokens (titles, chapter headings)
DEFAULT_STARTS = 8  # sequences that start like prompts
START_TOKENS = 32  # positions scored in each of them
DEFAULT_GREEDY = 32  # tokens decoded greedily per prompt
PROMPTS = [("plain", "In 1905, Albert Einstein published"), ("plain", "The capital of France is"),
           ("plain", "It was a dark and stormy night, and"), ("chat", "What is the capital of France?"),
           ("chat", "Write a short poem about the sea."), ("chat", "Explain photosynthesis in one sentence.")]


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


def stepwise_logprobs(model, ids: np.ndarray, bar=None) -> np.ndarray:
    """Like dense_logprobs, one token per forward pass (how flash mode generates)."""
    cache = make_prompt_cache(model)
    out = []
    for t in range(len(ids) - 1):
        logits = model(mx.array(ids[t : t + 1])[None], cache=cache)[0]
        out.append(np.array((logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(mx.float32)))
        if bar is not None:
            bar.update()
    return np.concatenate(out)


def perplexity(logprobs: np.ndarray, ids: np.ndarray) -> float:
    nll = -logprobs[np.arange(len(logprobs)), ids[1 : len(logprobs) + 1]]
    return float(math.exp(nll.mean()))


class LayerError(nn.Module):
    """Stands in for a flash layer's FFN: runs it, and the dense FFN on the same input, and keeps
    the relative error of the flash output per token and the share of the layer's neurons truly
    active there (|h| > t_l: not zero in a ReLU-family model), a host sync more per layer: timings are off."""

    def __init__(self, flash, dense, t: float = 0.0):
        super().__init__()
        self.flash, self.dense, self.t, self.errors, self.active = flash, dense, t, [], []

    def __call__(self, x):
        h = self.dense.activations(x)
        y, want = self.flash(x), self.dense.down(h)
        err = mx.linalg.norm((y - want).astype(mx.float32), axis=-1) / mx.linalg.norm(want.astype(mx.float32), axis=-1)
        active = (mx.abs(h) > self.t).astype(mx.float32).mean(axis=-1)
        self.errors.append(np.array(err).ravel())
        self.active.append(np.array(active).ravel())
        return y

    def mean(self) -> float:
        return float(np.mean(np.concatenate(self.errors))) if self.errors else 0.0

    def active_share(self) -> float:
        return float(np.mean(np.concatenate(self.active))) if self.active else 0.0


def compare(sets_dense: dict, sets_flash: dict, sets_ids: dict) -> dict:
    """Per set of sequences: perplexity of each mode, agreement, mean KL(dense || flash), first tokens' KL."""
    out = {}
    for name, dense in sets_dense.items():
        flash, ids = sets_flash[name], sets_ids[name]
        nll = lambda lps: np.concatenate([-lp[np.arange(len(lp)), s[1 : len(lp) + 1]] for lp, s in zip(lps, ids)])
        kl = [(np.exp(d) * (d - f)).sum(-1) for d, f in zip(dense, flash)]  # (positions,) per sequence
        agree = np.concatenate([d.argmax(-1) == f.argmax(-1) for d, f in zip(dense, flash)])
        ppl_d, ppl_f = float(math.exp(nll(dense).mean())), float(math.exp(nll(flash).mean()))
        out[name] = {"positions": int(len(agree)), "dense_perplexity": ppl_d, "perplexity": ppl_f,
                     "perplexity_vs_dense": ppl_f / ppl_d - 1, "agreement": float(agree.mean()),
                     "kl_mean": float(np.concatenate(kl).mean()), "kl_first_token": float(np.mean([k[0] for k in kl])),
                     "agreement_first_token": float(np.mean([d[0].argmax() == f[0].argmax()
                                                             for d, f in zip(dense, flash)]))}
    return out


def prompt_ids(tokenizer, kind: str, text: str) -> list:
    if kind == "chat" and has_chat_template(tokenizer):
        return chat_ids(tokenizer, text)
    return tokenizer.encode(text)


def greedy(model, tokenizer, n: int) -> list:
    """Per prompt: its greedy tokens and, at each, the margin between the two most likely (logits)."""
    out = []
    for kind, text in PROMPTS:
        ids, cache, toks, margins = prompt_ids(tokenizer, kind, text), make_prompt_cache(model), [], []
        x = mx.array(ids)[None]
        for _ in range(n):
            logits = model(x, cache=cache)[0, -1].astype(mx.float32)
            top = np.sort(np.array(logits))[-2:]
            toks.append(int(mx.argmax(logits).item()))
            margins.append(float(top[1] - top[0]))
            x = mx.array([[toks[-1]]])
        out.append({"kind": kind, "prompt": text, "tokens": toks, "margins": margins})
    return out


def greedy_match(dense: list, flash: list) -> dict:
    """How far flash's greedy decoding follows dense's: per prompt, the first differing position
    (None: identical) and dense's margin there (a near tie flips on any rounding)."""
    parts = []
    for d, f in zip(dense, flash):
        at = next((i for i, (a, b) in enumerate(zip(d["tokens"], f["tokens"])) if a != b), None)
        parts.append({"prompt": d["prompt"], "first_difference": at,
                      "dense_margin_there": None if at is None else d["margins"][at]})
    return {"identical": sum(p["first_difference"] is None for p in parts), "prompts": len(parts), "per_prompt": parts}


def oracle(folder, dense_ffns) -> list:
    """A perfect predictor: per layer, the true activations against the calibrated threshold t_l, so
    that exactly the active neurons are predicted (what sparsity costs, predictors apart)."""
    ts = FlashConfig.load(folder).predictors["activation_threshold"]
    return [lambda x, f=f, t=t: mx.abs(f.activations(x)) - t for f, t in zip(dense_ffns, ts)]


def evaluate(folder, text=None, tokens: int = DEFAULT_TOKENS, mode: str = "both", progress=True,
             configs=None, starts: int = DEFAULT_STARTS, greedy_tokens: int = DEFAULT_GREEDY, **flash_options):
    """Returns {"dense": {...}, "flash": [{...}, ...]}: perplexity, agreement, KL, the worst FFN layer,
    greedy decoding and flash statistics.

    configs: flash option dicts to evaluate one after another (default: one, `flash_options`)."""
    folder = resolve(model_for(str(folder)))  # a built-in name: its converted, calibrated copy
    if not is_flash_folder(folder):
        raise FlashError(f"{folder} is not a converted flash model: run python -m mlx_flash.convert first")
    tokenizer = load_tokenizer(folder)
    path = text or HELDOUT_TEXT
    ids = {"long": [text_tokens(tokenizer, path, tokens)]}
    if starts:
        ids["starts"] = list(start_sequences(tokenizer, read_texts([str(path)]), starts, START_TOKENS + 1))
    positions = sum(len(s) - 1 for v in ids.values() for s in v)
    result = {"tokens": tokens, "starts": starts, "text": str(text or "mlx_flash/data/heldout.txt"), "flash": []}
    dense_lp, dense_greedy, dense_ffns = None, None, None
    if mode in ("dense", "both"):
        model, _ = load_flash(folder, "dense")
        t0 = time.perf_counter()
        dense_lp = {k: [dense_logprobs(model, s) for s in v] for k, v in ids.items()}
        result["dense"] = {"perplexity": perplexity(dense_lp["long"][0], ids["long"][0]),
                           "seconds": time.perf_counter() - t0}
        if mode == "both":
            dense_greedy = greedy(model, tokenizer, greedy_tokens) if greedy_tokens else None
            dense_ffns = [layer.mlp for layer in model.layers]  # kept: each flash layer is compared with them
        del model
    if mode in ("flash", "both"):
        for opts in configs or [flash_options]:
            longest = max(len(s) for v in ids.values() for s in v)
            opts = {"max_kv_size": max(DEFAULT_MAX_KV_SIZE, longest, greedy_tokens + 64), **opts}  # all fit
            load_opts = {k: v for k, v in opts.items() if k != "oracle"}
            if opts.get("oracle"):
                if dense_ffns is None:
                    raise FlashError("--oracle compares with dense: use --mode both")
                load_opts["predictor"] = oracle(folder, dense_ffns)
            model, cfg = load_flash(folder, "flash", **load_opts)
            moe = not hasattr(cfg, "predictors")  # a mixture of experts: its router is exact (flash/experts.py)
            probes = None
            if dense_ffns is not None and not moe:
                ts = cfg.predictors["activation_threshold"]
                probes = [LayerError(layer.mlp, d, t) for layer, d, t in zip(model.layers, dense_ffns, ts)]
                for layer, probe in zip(model.layers, probes):
                    layer.mlp = probe
            t0 = time.perf_counter()
            with tqdm(total=positions, desc="flash, token by token", unit="tok", disable=not progress) as bar:
                lp = {k: [stepwise_logprobs(model, s, bar) for s in v] for k, v in ids.items()}
            level = "router" if moe else "oracle" if opts.get("oracle") else opts.get("recall") or \
                cfg.predictors["target_recall"]
            r = {"options": opts, "recall": level, "window": model.flash_plan.window,
                 "sparsity_target": None if moe else cfg.predictors.get("sparsity_target"),
                 "activation": "experts" if moe else cfg.activation,
                 "pinned": 0 if moe else sum(map(len, cfg.predictors.get("pinned") or [])),
                 "perplexity": perplexity(lp["long"][0], ids["long"][0]), "seconds": time.perf_counter() - t0,
                 "stats": model.flash_stats.snapshot(), "plan": model.flash_plan.to_dict()}
            if dense_lp is not None:
                r["sets"] = compare(dense_lp, lp, ids)
                r.update({k: r["sets"]["long"][k] for k in ("perplexity_vs_dense", "agreement", "kl_mean")})
            if probes is not None:
                r["layer_rel_err"] = [p.mean() for p in probes]
                # the share of the FFN truly active per token (not zero in a ReLU-family model), next to
                # the share flash predicts (stats' ffn_share_predicted): the paper's Table 2 pair
                r["ffn_share_active"] = float(np.mean([p.active_share() for p in probes]))
                worst = int(np.argmax(r["layer_rel_err"]))
                r["worst_layer"] = {"layer": worst, "rel_err_mean": r["layer_rel_err"][worst]}
                for layer, probe in zip(model.layers, probes):
                    layer.mlp = probe.flash
            if dense_greedy is not None:
                r["greedy"] = greedy_match(dense_greedy, greedy(model, tokenizer, greedy_tokens))
            result["flash"].append(r)
            model.flash_reader.close()
            del model
    return result


def markdown(r: dict) -> str:
    """The README's quality table: the held-out text, then the sequence starts, then greedy decoding."""
    rows = ["| mode | sparsity | recall | window | pinned | FFN active | FFN predicted | FFN held | MB read/token | "
            "perplexity | vs dense | agreement | KL | starts: vs dense | agreement | KL, first token | worst FFN layer | "
            "greedy = dense |", "|" + " --- |" * 18]
    if "dense" in r:
        rows.append(f"| dense | - | - | - | - | - | 100% | 100% | 0 | {r['dense']['perplexity']:.3f} |" + " - |" * 8)
    for f in r["flash"]:
        s = f["stats"]
        sp = f"{f['sparsity_target']:.0%}" if f["sparsity_target"] else f"{f.get('activation', 'relu')}: h = 0"
        long, st = f.get("sets", {}).get("long"), f.get("sets", {}).get("starts")
        cols = [f"{long['perplexity_vs_dense']:+.1%}", f"{long['agreement']:.1%}", f"{long['kl_mean']:.4f}"] \
            if long else ["-"] * 3
        cols += [f"{st['perplexity_vs_dense']:+.1%}", f"{st['agreement']:.1%}", f"{st['kl_first_token']:.4f}"] \
            if st else ["-"] * 3
        w = f.get("worst_layer")
        cols.append(f"{w['layer']} ({w['rel_err_mean']:.3f})" if w else "-")
        g = f.get("greedy")
        cols.append(f"{g['identical']}/{g['prompts']}" if g else "-")
        active = f"{f['ffn_share_active']:.1%}" if "ffn_share_active" in f else "-"
        if s.get("expert_hit_rate") is not None:  # a mixture of experts: routed experts, and the slots' share
            pl = f["plan"]
            sp = f"experts, hit rate {s['expert_hit_rate']:.2f}"
            predicted = s["experts_needed_per_token"] / (pl["moe_layers"] * pl["experts"])
            held = pl["slots"] / pl["experts"]
        else:
            predicted, held = s["ffn_share_predicted"], s["ffn_share_resident"]
        rows.append(f"| flash | {sp} | {f['recall']} | {f['window']} | {f['pinned']} | {active} | {predicted:.1%} | "
                    f"{held:.1%} | {s['bytes_read_per_token'] / 1e6:.2f} | {f['perplexity']:.3f} | "
                    + " | ".join(cols) + " |")
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
    p.add_argument("--oracle", action="store_true",
                   help="also evaluate a perfect predictor (the true active sets at the calibrated sparsity)")
    p.add_argument("--starts", type=int, default=DEFAULT_STARTS,
                   help=f"also score this many sequences that start like prompts ({START_TOKENS} tokens each)")
    p.add_argument("--greedy", type=int, default=DEFAULT_GREEDY,
                   help=f"tokens decoded greedily from each of {len(PROMPTS)} prompts, flash against dense (0: skip)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.tokens < 2:
        raise FlashError("--tokens must be at least 2")
    base = {k: v for k, v in {"dram_budget": args.dram_budget, "window": args.window}.items() if v is not None}
    configs = [dict(base, recall=r) for r in args.recall] if args.recall else [base]
    if args.oracle:
        configs.append(dict(base, oracle=True))
    if args.starts < 0 or args.greedy < 0:
        raise FlashError("--starts and --greedy must be at least 0")
    r = evaluate(args.model, args.text, args.tokens, args.mode, configs=configs, starts=args.starts,
                 greedy_tokens=args.greedy)
    print(f"held-out text: {r['text']}: {r['tokens']} tokens, and {r['starts']} sequences of {START_TOKENS} from "
          "paragraph and chat starts; one token per forward pass in flash mode; KL(dense || flash) per token")
    print(markdown(r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=1)


if __name__ == "__main__":
    main()
