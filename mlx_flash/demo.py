"""`make demo`: convert the built-in model once, then generate from it.

    python -m mlx_flash.demo [--model smollm2-135m] [--prompt ...]
"""

import argparse
import sys

from .convert import convert
from .errors import cli
from .generate import DEFAULT_PROMPT, stats_line, stream
from .load import is_flash_folder, load
from .utils import DEFAULT_MODEL, models_dir


def step(msg: str):
    print(f"\n== {msg}", file=sys.stderr, flush=True)


def run(label: str, model, tokenizer, prompt: str, max_tokens: int):
    step(label)
    print(prompt, end="", flush=True)
    last = None
    for r in stream(model, tokenizer, prompt, max_tokens=max_tokens):
        print(r.text, end="", flush=True)
        last = r
    print(flush=True)
    print(stats_line(last), file=sys.stderr, flush=True)


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description="Convert the built-in model and generate from it.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args(argv)

    folder = models_dir() / args.model
    if not is_flash_folder(folder):
        step(f"converting {args.model} into the flash layout at {folder}")
        convert(args.model, folder)
    model, tokenizer = load(str(folder), mode="dense")
    run(f"dense: every weight in memory ({folder})", model, tokenizer, args.prompt, args.max_tokens)


if __name__ == "__main__":
    main()
