"""The kept conversation cache (conversation.py): a request that shares a prefix with the previous one
computes only what follows it, with the logits of a fresh run; generate --chat and the server use it."""

import json
import subprocess
import sys
import threading
import urllib.request

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_flash.conversation import Conversation, common_prefix
from mlx_flash.generate import stream
from mlx_flash.load import load
from mlx_flash.server import Engine, make_server

IDS = np.random.default_rng(2).integers(3, 500, 40).tolist()


def last_logits(model, ids, cache=None):
    cache = cache if cache is not None else make_prompt_cache(model)
    return np.array(model(mx.array(ids)[None], cache=cache)[0, -1].astype(mx.float32))


@pytest.mark.parametrize("mode", ["dense", "flash"])
def test_second_request_reuses_exactly_the_common_prefix(trained_flash, mode):
    folder = trained_flash("llama_relu_untied")
    model, tok = load(str(folder), mode=mode, **({"prompt_mode": "pass"} if mode == "flash" else {}))
    conv = Conversation(model)
    first = list(stream(model, tok, IDS, max_tokens=6, conversation=conv))
    generated = [r.token for r in first]
    assert first[-1].cached_tokens == 0 and first[-1].prompt_tokens == len(IDS)
    assert conv.offset() == len(conv.tokens) and conv.tokens == (IDS + generated)[: conv.offset()]

    # the next turn: the whole conversation again, plus new tokens
    turn = IDS + generated + [7, 8, 9, 10]
    again = list(stream(model, tok, turn, max_tokens=6, conversation=conv))
    held = again[-1].cached_tokens
    assert held == common_prefix(IDS + generated, turn) and held >= len(IDS) + len(generated) - 1
    if mode == "flash":
        # only the new ones were computed (mlx-lm runs the prompt's last token as a step of its own)
        assert again[-1].flash["prompt_tokens"] == len(turn) - held - 1
    fresh = list(stream(model, tok, turn, max_tokens=6))
    assert [r.token for r in again] == [r.token for r in fresh]

    # logits after reuse equal a fresh run's, for a prompt that departs from the held tokens midway
    other = IDS[:25] + [11, 12, 13]
    cache, held = conv.reuse(other)
    assert held == 25 and conv.offset() == 25
    np.testing.assert_allclose(last_logits(model, other[held:], cache), last_logits(model, other),
                               rtol=1e-4, atol=1e-4)
    cache, held = conv.reuse(other[:10])  # a prefix of what it holds: the last token still runs
    assert held == 9


def test_cut_short_and_failed_requests_leave_a_consistent_cache(tiny_flash):
    model, tok = load(str(tiny_flash("llama_silu_tied")))
    conv = Conversation(model)
    gen = stream(model, tok, IDS, max_tokens=20, conversation=conv)
    got = [next(gen).token for _ in range(3)]
    gen.close()  # the client went away after 3 tokens
    assert conv.tokens == (IDS + got)[: conv.offset()] and conv.offset() >= len(IDS)
    ffn = model.layers[1].mlp

    def failing(x):  # a read that fails in the middle of the model, after layer 0 stored its keys
        raise OSError("the disk went away")

    model.layers[1].mlp = failing
    with pytest.raises(OSError):
        list(stream(model, tok, IDS + got + [5, 6], max_tokens=4, conversation=conv))
    model.layers[1].mlp = ffn
    assert conv.cache is None and conv.tokens == []  # dropped: its layers may disagree
    assert list(stream(model, tok, IDS, max_tokens=2, conversation=conv))[-1].cached_tokens == 0


def test_generate_chat_keeps_the_cache_between_turns(tiny_flash):
    folder = tiny_flash("llama_silu_tied")
    p = subprocess.run([sys.executable, "-m", "mlx_flash.generate", "--model", str(folder), "--chat", "-m", "4"],
                       input="hello there\nand again\nonce more\n", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("prompt:")]
    assert len(lines) == 3 and "cached" not in lines[0]
    assert all(" cached)" in l for l in lines[1:]), lines


@pytest.mark.parametrize("keep", [True, False])
def test_server_reports_cached_prompt_tokens(tiny_flash, keep):
    folder = tiny_flash("llama_silu_tied")
    model, tok = load(str(folder))
    httpd = make_server(Engine(model, tok, folder.name, keep_cache=keep), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        messages, cached = [], []
        for text in ("hi", "and then?", "why?"):
            messages.append({"role": "user", "content": text})
            body = json.dumps({"messages": messages, "max_tokens": 4, "temperature": 0}).encode()
            req = urllib.request.Request(httpd.url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                reply = json.loads(r.read())
            messages.append(reply["choices"][0]["message"])
            cached.append(reply["usage"]["prompt_tokens_details"]["cached_tokens"])
            assert reply["flash"]["time_to_first_token_s"] > 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    if keep:
        assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
    else:
        assert cached == [0, 0, 0]


def test_chat_benchmark_turns_with_and_without_the_kept_cache(tiny_flash, capsys):
    from mlx_flash import bench

    res = bench.main(["--chat", "--model", str(tiny_flash("llama_silu_tied")), "--document-chars", "300",
                      "--max-tokens", "2"])
    kept, fresh = res["kept"], res["not_kept"]
    assert [t["prompt_tokens"] for t in kept] == [t["prompt_tokens"] for t in fresh]
    assert kept[0]["computed_tokens"] == fresh[0]["computed_tokens"] == kept[0]["prompt_tokens"]
    for k, f in zip(kept[1:], fresh[1:]):
        assert k["computed_tokens"] < f["computed_tokens"] == f["prompt_tokens"] and k["ttft_s"] > 0
    assert "| 3 |" in capsys.readouterr().out
