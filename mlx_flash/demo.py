"""`make demo`: the whole pipeline on the built-in model.

    python -m mlx_flash.demo [--model smollm2-135m] [--prompt ...] [--dram-budget 140%] [--recall R]

1. convert it into the flash layout (once, seconds);
2. calibrate sparsity and train the predictors on the shipped text (once; minutes
   on MLX's x86 CPU backend, seconds on Apple silicon);
3. generate densely, then in flash mode within a DRAM budget, and show where
   each flash token's time went.
"""

import argparse
import sys

from .errors import cli
from .generate import DEFAULT_PROMPT, stats_line, stream
from .load import load
from .prepare import prepare
from .sources import DEFAULT_MODEL

# The built-in model's embedding and attention are ~45% of it and its SwiGLU FFN is barely sparse:
# flash mode needs more memory than the model to stay within a few % of dense perplexity (README, Results).
DEFAULT_BUDGET = "140%"
DEFAULT_RECALL = None  # the calibrated one (0.98); windows that must shrink cost far more than lower recall
DEFAULT_CONTEXT = 256  # tokens: the demo's prompt and 24 new ones, with room to spare


def step(msg: str):
    print(f"\n== {msg}", file=sys.stderr, flush=True)


def run(label: str, model, tokenizer, prompt: str, max_tokens: int):
    step(label)
    print(f"[{prompt}]", end="", flush=True)  # the streamed text starts where the prompt ends
    last = None
    for r in stream(model, tokenizer, prompt, max_tokens=max_tokens):
        print(r.text, end="", flush=True)
        last = r
    print(flush=True)
    print(stats_line(last), file=sys.stderr, flush=True)


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Convert the built-in model and generate from it.")
    p.add_argument("--model", "-M", default=DEFAULT_MODEL, help="built-in name or any source (default: %(default)s)")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", "-m", type=int, default=24)
    p.add_argument("--dram-budget", default=DEFAULT_BUDGET, help="flash run's budget (default: %(default)s)")
    p.add_argument("--recall", type=float, default=DEFAULT_RECALL)
    p.add_argument("--max-kv-size", type=int, default=DEFAULT_CONTEXT,
                   help="flash run's reserved context in tokens (default: %(default)s, enough for the demo)")
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)

    folder = prepare(args.model, announce=step)
    model, tokenizer = load(str(folder), mode="dense")
    run(f"dense: every weight in memory ({folder})", model, tokenizer, args.prompt, args.max_tokens)
    del model

    model, tokenizer = load(str(folder), mode="flash", dram_budget=args.dram_budget, recall=args.recall,
                            max_kv_size=args.max_kv_size)
    plan = model.flash_plan
    run(f"flash: budget {plan.budget / 1e6:.1f} MB of a {plan.model / 1e6:.1f} MB model; FFN neurons read "
        f"from {folder}/ffn.bundles with direct I/O", model, tokenizer, args.prompt, args.max_tokens)
    s = model.flash_stats.snapshot()
    print(f"per token: I/O {s['ms_io']:.1f} ms ({s['bytes_read_per_token'] / 1e6:.2f} MB, {s['ffn_share_read']:.1%} "
          f"of the FFN), memory management {s['ms_memory']:.1f} ms, compute (attention, predictors, FFN; "
          f"generate --profile splits it) {s['ms_compute']:.1f} ms; "
          f"window holds {s['ffn_share_resident']:.1%} of the FFN", file=sys.stderr)


if __name__ == "__main__":
    main()
