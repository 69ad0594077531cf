"""A chat's turns against the server, with and without the kept conversation cache (conversation.py):

    python -m mlx_flash.bench --chat [--model smollm2-135m] [--mode flash --dram-budget 160%] [--document-chars 2000]

The first turn pastes a document (the shipped calibration text's beginning) and asks about it; two
more questions follow. Each request carries the whole conversation, as the menu-bar app sends it, to
an in-process server; per turn the prompt tokens, those computed, and the time to the first token
the server reports; then the same conversation against a server that keeps nothing.
"""

import argparse
import json
import time
from pathlib import Path
from typing import List

QUESTIONS = ("Who is the story about?", "What does Mrs. Bennet want?", "Summarize it in one sentence.")


def chat_turns(model, tokenizer, name: str, mode: str, keep: bool, document: str, max_tokens: int) -> List[dict]:
    """Three turns of one conversation (a pasted document, then questions) sent to the server as the
    menu-bar app sends them, the whole conversation each time; per turn what the server reports."""
    import threading
    import urllib.request

    from ..server import Engine, make_server

    httpd = make_server(Engine(model, tokenizer, name, mode, keep_cache=keep), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    messages, out = [], []
    try:
        for i, q in enumerate(QUESTIONS):
            messages.append({"role": "user", "content": (document + "\n\n" if i == 0 else "") + q})
            body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
            req = urllib.request.Request(httpd.url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as r:
                reply = json.loads(r.read())
            messages.append(reply["choices"][0]["message"])
            u, f = reply["usage"], reply["flash"]
            out.append({"turn": i + 1, "prompt_tokens": u["prompt_tokens"],
                        "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                        "computed_tokens": u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"],
                        "ttft_s": f["time_to_first_token_s"], "request_s": time.perf_counter() - t0,
                        "prompt_mb_read": f.get("prompt_bytes_read", 0) / 1e6})
    finally:
        httpd.shutdown()
        httpd.server_close()
    return out


def setup_arg_parser():
    from ..generate import add_model_arguments

    p = argparse.ArgumentParser(prog="python -m mlx_flash.bench --chat",
                                description="Time to first token of a three-turn chat against the server, with "
                                            "and without the kept conversation cache.")
    p.add_argument("--chat", action="store_true", required=True, help="this mode of the benchmark")
    add_model_arguments(p)
    p.add_argument("--document-chars", type=int, default=2000, help="characters of text pasted in the first turn")
    p.add_argument("--max-tokens", "-m", type=int, default=16)
    p.add_argument("--json", default=None)
    return p


def run(argv) -> dict:
    from ..flash.sparsity import CALIBRATION_TEXT
    from ..generate import flash_options
    from ..load import load
    from ..prepare import model_for

    args = setup_arg_parser().parse_args(argv)
    model, tok = load(model_for(args.model, args.mode), mode=args.mode, **flash_options(args))
    document = CALIBRATION_TEXT.read_text()[: args.document_chars]
    res = {"model": args.model, "mode": args.mode, "document_chars": args.document_chars,
           "kept": chat_turns(model, tok, args.model, args.mode, True, document, args.max_tokens),
           "not_kept": chat_turns(model, tok, args.model, args.mode, False, document, args.max_tokens)}
    print(f"# three-turn chat against the server: {args.model}, {args.mode} mode, the first turn pastes "
          f"{args.document_chars} characters; time to first token as the server reports it")
    print("\n| turn | prompt tokens | kept cache: computed | kept cache: first token s | not kept: computed | "
          "not kept: first token s |\n| --- | --- | --- | --- | --- | --- |")
    for a, b in zip(res["kept"], res["not_kept"]):
        print(f"| {a['turn']} | {a['prompt_tokens']} | {a['computed_tokens']} | {a['ttft_s']:.2f} | "
              f"{b['computed_tokens']} | {b['ttft_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res
