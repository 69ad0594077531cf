"""Stream tokens from a flash-mode model, then show where each token's time and bytes went.

    python python/stream_with_stats.py [--model models/smollm2-135m] [--dram-budget 0.75] [--window 5]

The statistics are per decode token, split like the paper's latency breakdown:
predictor, neuron-window bookkeeping ("memory management"), disk reads, FFN compute.
"""

import argparse
from pathlib import Path

from mlx_flash.errors import cli
from mlx_flash.generate import stream
from mlx_flash.load import load
from mlx_flash.prepare import prepare
from mlx_flash.sources import DEFAULT_MODEL, models_dir

DEFAULT_FOLDER = str(models_dir() / DEFAULT_MODEL)


@cli
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-M", default=DEFAULT_FOLDER, help="converted flash folder (default: %(default)s)")
    p.add_argument("--prompt", "-p", default="Once upon a time")
    p.add_argument("--max-tokens", "-m", type=int, default=48)
    p.add_argument("--dram-budget", default=None, help="bytes (60M) or a fraction of the model (0.6)")
    p.add_argument("--window", type=int, default=None, help="tokens whose neurons stay in DRAM")
    args = p.parse_args()
    if Path(args.model).resolve() == Path(DEFAULT_FOLDER).resolve():
        prepare(folder=args.model)

    options = {k: v for k, v in {"dram_budget": args.dram_budget, "window": args.window}.items() if v is not None}
    # profile: extra syncs so that attention, prediction and FFN compute are timed apart
    model, tokenizer = load(args.model, mode="flash", profile=True, **options)
    plan = model.flash_plan
    budget = f"{plan.budget / 1e6:.1f} MB" if plan.budget else "none"
    print(f"model {plan.model / 1e6:.1f} MB, budget {budget}, planned {plan.total / 1e6:.1f} MB, window {plan.window}")

    print(args.prompt, end="", flush=True)
    for r in stream(model, tokenizer, args.prompt, max_tokens=args.max_tokens):
        print(r.text, end="", flush=True)
    print()

    s = r.flash  # cumulative over this request, per decode token
    print(f"\nper decode token ({s['decode_tokens']} tokens, {1000 / r.generation_tps:.1f} ms/token overall):")
    for name, key in [("attention+rest", "ms_attention"), ("predict", "ms_predict"),
                      ("memory", "ms_memory"), ("io", "ms_io"), ("ffn", "ms_ffn")]:
        print(f"  {name:<15}{s[key]:8.2f} ms")
    print(f"  {'MB read':<15}{s['bytes_read_per_token'] / 1e6:8.3f} MB/token at {s['read_gb_per_s']:.3f} GB/s")
    print(f"  FFN neurons: predicted {s['ffn_share_predicted']:.1%}, held {s['ffn_share_resident']:.1%}, "
          f"read {s['ffn_share_read']:.1%}")


if __name__ == "__main__":
    main()
