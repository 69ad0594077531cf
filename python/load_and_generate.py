"""Load a converted model and generate text: the smallest use of the Python API.

    python python/load_and_generate.py [--model models/smollm2-135m] [--prompt "..."] [--mode flash]

Without --model it uses the built-in SmolLM2-135M, converting it and training its
predictors the first time (what `make demo` does; minutes on MLX's x86 CPU backend).
"""

import argparse
from pathlib import Path

from mlx_flash.errors import cli
from mlx_flash.generate import stream
from mlx_flash.load import MODES, load
from mlx_flash.prepare import prepare
from mlx_flash.sources import DEFAULT_MODEL, models_dir

DEFAULT_FOLDER = str(models_dir() / DEFAULT_MODEL)


@cli
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-M", default=DEFAULT_FOLDER, help="converted flash folder (default: %(default)s)")
    p.add_argument("--prompt", "-p", default="The capital of France is")
    p.add_argument("--max-tokens", "-m", type=int, default=48)
    p.add_argument("--mode", choices=MODES, default="flash")
    p.add_argument("--dram-budget", default=None, help="flash mode: bytes (60M) or a fraction of the model (0.6)")
    args = p.parse_args()
    if Path(args.model).resolve() == Path(DEFAULT_FOLDER).resolve():
        prepare(folder=args.model)

    options = {"dram_budget": args.dram_budget} if args.mode == "flash" and args.dram_budget else {}
    model, tokenizer = load(args.model, mode=args.mode, **options)

    text, last = "", None
    for r in stream(model, tokenizer, args.prompt, max_tokens=args.max_tokens):  # greedy by default
        text += r.text
        last = r
    print(args.prompt + text)
    print(f"[{args.mode}] {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s, "
          f"peak memory {last.peak_memory * 1e3:.1f} MB")


if __name__ == "__main__":
    main()
