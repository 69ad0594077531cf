"""Generate from the same prompt densely and in flash mode; compare text, tokens, speed and bytes read.

    python python/compare_dense_flash.py [--model models/smollm2-135m] [--dram-budget 0.75]

Dense mode holds every weight in memory; flash mode reads the predicted FFN
neurons from disk each token. Both decode greedily, so their tokens should
agree until the predictors miss a neuron that matters.
"""

import argparse
from pathlib import Path

from mlx_flash.errors import cli
from mlx_flash.generate import stream
from mlx_flash.load import load
from mlx_flash.prepare import prepare
from mlx_flash.sources import DEFAULT_MODEL, models_dir

DEFAULT_FOLDER = str(models_dir() / DEFAULT_MODEL)


def run(folder: str, mode: str, prompt: str, max_tokens: int, **options) -> dict:
    model, tokenizer = load(folder, mode=mode, **options)
    responses = list(stream(model, tokenizer, prompt, max_tokens=max_tokens))  # greedy
    last = responses[-1]
    return {"text": "".join(r.text for r in responses), "tokens": [r.token for r in responses],
            "ms": 1000 / last.generation_tps, "read": last.flash.get("bytes_read_per_token", 0)}


@cli
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-M", default=DEFAULT_FOLDER, help="converted flash folder (default: %(default)s)")
    p.add_argument("--prompt", "-p", default="The capital of France is")
    p.add_argument("--max-tokens", "-m", type=int, default=32)
    p.add_argument("--dram-budget", default=None, help="flash mode: bytes (60M) or a fraction of the model (0.6)")
    args = p.parse_args()
    if Path(args.model).resolve() == Path(DEFAULT_FOLDER).resolve():
        prepare(folder=args.model)

    dense = run(args.model, "dense", args.prompt, args.max_tokens)
    options = {"dram_budget": args.dram_budget} if args.dram_budget else {}
    flash = run(args.model, "flash", args.prompt, args.max_tokens, **options)

    for name, r in (("dense", dense), ("flash", flash)):
        print(f"{name}: {args.prompt}{r['text']}")
    same = [a == b for a, b in zip(dense["tokens"], flash["tokens"])]
    first = same.index(False) if False in same else len(same)
    print(f"greedy tokens agree: {'yes' if all(same) else 'no'} ({first} of {len(same)} before the first difference)")
    print(f"{'mode':<6}{'ms/token':>10}{'MB read/token':>15}")
    for name, r in (("dense", dense), ("flash", flash)):
        print(f"{name:<6}{r['ms']:10.1f}{r['read'] / 1e6:15.3f}")


if __name__ == "__main__":
    main()
