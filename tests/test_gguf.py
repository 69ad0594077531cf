"""GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them, read back by load_gguf.

Each test builds a tiny random model with mlx-lm's own classes, writes it with gguf-py's GGUFWriter
(its tensor-name map, llama's Q/K permutation, Gemma's norms + 1), and checks that load_gguf gives
weights that mlx-lm's Model class, built from the config load_gguf returns, runs to the same logits.
gguf-py cannot quantize k-quants, so those tensors get random valid blocks, and the reference is
gguf-py's own dequantization of the same bytes.
"""

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from mlx_lm.models import gemma3_text, llama, qwen2, qwen3

from mlx_flash.errors import FlashError
from mlx_flash.gguf import load_gguf

VOCAB = 256
SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
             vocab_size=VOCAB, max_position_embeddings=4096)  # ffn_down's rows (256) fit k-quant blocks
CONFIGS = {
    "llama": dict(SMALL, model_type="llama", num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False),
    "qwen2": dict(SMALL, model_type="qwen2", num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                  tie_word_embeddings=True),
    "qwen3": dict(SMALL, model_type="qwen3", num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                  rope_theta=1e6, tie_word_embeddings=False,
                  rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}),
    "gemma3": dict(SMALL, model_type="gemma3_text", num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
                   rope_theta=1e6, rope_local_base_freq=10000.0, query_pre_attn_scalar=32, sliding_window=4,
                   sliding_window_pattern=6, num_hidden_layers=6,  # mlx-lm's Gemma 3 needs a global layer
                   rope_scaling={"type": "linear", "factor": 8.0}),
}
MODULES = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma3": gemma3_text}
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "gemma3": gguf.MODEL_ARCH.GEMMA3}
MIXED = {  # GGUF tensor kind -> type, like a llama.cpp mixture (k-quants only where rows are 256s)
    "token_embd": T.Q8_0, "output": T.Q4_0, "attn_q": T.Q8_0, "attn_k": T.Q4_0, "attn_v": T.Q4_1,
    "attn_output": T.Q5_0, "ffn_gate": T.F16, "ffn_up": T.Q5_1, "ffn_down": (T.Q4_K, T.Q6_K),
}
K_QUANT_SCALES = {  # byte offsets of each block's float16 scales (d, dmin) in the types we fill at random
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_NL: (0,),
}
IDS = mx.array([[1, 17, 200, 3, 99, 42, 7, 255, 64, 5]])


def tokenizer_metadata(w: gguf.GGUFWriter):
    """A minimal GPT-2 BPE vocabulary: 254 byte tokens and two merges."""
    byte_chars = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(256, 256 + 161)]
    tokens = byte_chars[:254] + ["ab", "abc"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(["a b", "ab c"])
    w.add_token_types([1] * len(tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def random_model(arch: str, config: dict, seed: int = 0):
    mx.random.seed(seed)
    model = MODULES[arch].Model(MODULES[arch].ModelArgs.from_dict(config))
    if arch == "gemma3":
        model.sanitize({})  # tied, like every Gemma 3: no lm_head
    model.update(tree_map_with_path(
        lambda p, v: 1 + 0.3 * mx.random.normal(v.shape) if "norm" in p else 0.2 * mx.random.normal(v.shape),
        model.parameters()))
    mx.eval(model.parameters())
    return model


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's half-split RoPE rows -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(kind: T, shape, rng) -> np.ndarray:
    """Valid random blocks of a type gguf-py cannot quantize: random bits, small finite scales."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for at in K_QUANT_SCALES[kind]:
        scale = rng.uniform(-0.02, 0.02, len(blocks)).astype(np.float16)
        blocks[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw


def write_gguf(path, arch: str, config: dict, model, types=None, rng=None):
    """Write `model` as llama.cpp's converter would, each tensor in types.get(kind, F32).

    Returns {HF name: the values the file holds, in HF order, as a correct reader must produce them}."""
    types = types or {}
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCHS[arch]])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    if arch == "gemma3":
        w.add_sliding_window(config["sliding_window"])
    if "rope_scaling" in config:
        w.add_rope_scaling_type(gguf.RopeScalingType(config["rope_scaling"]["type"]))
        w.add_rope_scaling_factor(config["rope_scaling"]["factor"])
        if "original_max_position_embeddings" in config["rope_scaling"]:
            w.add_rope_scaling_orig_ctx_len(config["rope_scaling"]["original_max_position_embeddings"])
    tokenizer_metadata(w)

    names = gguf.get_tensor_name_map(ARCHS[arch], config["num_hidden_layers"])
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    expected = {}
    for key, value in tree_flatten(model.parameters()):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        data = np.array(value)
        if arch == "llama" and ".attn_q." in name:
            data = permute(data, n_head)
        elif arch == "llama" and ".attn_k." in name:
            data = permute(data, n_kv)
        elif arch == "gemma3" and key.endswith("norm.weight"):
            data = data + 1  # Gemma3RMSNorm's 1 + w
        kind = types.get(name.split(".")[-2], T.F32) if data.ndim == 2 else T.F32
        if isinstance(kind, tuple):  # by layer, in turn
            kind = kind[int(name.split(".")[1]) % len(kind)]
        if kind == T.F32:
            w.add_tensor(name, data)
            expected[key] = np.array(value)
            continue
        if kind == T.F16:
            w.add_tensor(name, data.astype(np.float16))
            stored = data.astype(np.float16).astype(np.float32)
        else:
            raw = random_blocks(kind, data.shape, rng) if kind in K_QUANT_SCALES else gguf.quants.quantize(data, kind)
            w.add_tensor(name, raw, raw_dtype=kind)
            stored = gguf.quants.dequantize(raw, kind)
        if arch == "llama" and ".attn_q." in name:
            stored = unpermute(stored, n_head)
        elif arch == "llama" and ".attn_k." in name:
            stored = unpermute(stored, n_kv)
        expected[key] = stored
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def model_from(arch: str, config: dict, weights: dict):
    """mlx-lm's Model for `config`, quantized where the weights come quantized (mlx-lm's predicate)."""
    model = MODULES[arch].Model(MODULES[arch].ModelArgs.from_dict(config))
    weights = model.sanitize(dict(weights))
    q = config.get("quantization")
    if q:
        nn.quantize(model, class_predicate=lambda p, m: f"{p}.scales" in weights and
                    {k: q.get(p, q)[k] for k in ("group_size", "bits")})
    model.load_weights(list(weights.items()), strict=True)
    # compute in float32: float16 values and scales are exact in it, and activations are then comparable
    model.update(tree_map(lambda v: v.astype(mx.float32) if v.dtype in (mx.float16, mx.bfloat16) else v,
                          model.parameters()))
    mx.eval(model.parameters())
    return model


def as_float(weights: dict, key: str) -> np.ndarray:
    """A loaded weight's values as float32, dequantized if it came as an affine triple."""
    module = key.removesuffix(".weight")
    if key.endswith(".weight") and f"{module}.scales" in weights:
        w, s, b = (weights[f"{module}.{p}"] for p in ("weight", "scales", "biases"))
        bits = w.shape[-1] * 32 // (s.shape[-1] * 32)
        return np.array(mx.dequantize(w, s, b, group_size=32, bits=bits).astype(mx.float32))
    return np.array(weights[key].astype(mx.float32))


def reference_weights(expected: dict, weights: dict) -> dict:
    """Check each loaded weight against what the file holds; return those values for a reference model.

    Tensors dequantized by load_gguf (float16) must equal gguf-py's dequantization exactly (rounded
    to float16); affine triples up to float16 rounding of scale * q + bias."""
    reference = {}
    for key, want in expected.items():
        got = as_float(weights, key)
        if weights[key].dtype in (mx.float16, mx.bfloat16):
            rounded = np.array(mx.array(want).astype(weights[key].dtype).astype(mx.float32))
            assert np.array_equal(got, rounded), key
            reference[key] = mx.array(want).astype(weights[key].dtype)
        else:
            np.testing.assert_allclose(got, want, atol=1e-6 + 2e-3 * np.abs(want).max(), err_msg=key)
            reference[key] = mx.array(want)
    return reference


def logits(model) -> np.ndarray:
    return np.array(model(IDS).astype(mx.float32))


@pytest.mark.parametrize("arch", CONFIGS)
def test_float_gguf_round_trips(arch, tmp_path):
    """All-F32: the same weights (un-permuted, Gemma's + 1 undone), the same geometry, the same logits."""
    source = random_model(arch, CONFIGS[arch])
    write_gguf(tmp_path / "m.gguf", arch, CONFIGS[arch], source)
    config, weights, tok = load_gguf(tmp_path / "m.gguf")

    want = CONFIGS[arch]
    assert {k: config[k] for k in want} == want
    assert "quantization" not in config
    assert tok["model"] == "gpt2" and tok["merges"] == ["a b", "ab c"] and tok["tokens"][-1] == "abc"
    assert (tok["bos"], tok["eos"], tok["token_type"][:3]) == (1, 2, [1, 1, 1])
    params = dict(tree_flatten(source.parameters()))
    assert set(weights) == set(params)
    for key, v in params.items():
        if arch == "gemma3" and key.endswith("norm.weight"):  # (w + 1) - 1 in float32
            assert mx.allclose(weights[key], v, atol=1e-6).item(), key
        else:
            assert weights[key].dtype == mx.float32 and mx.array_equal(weights[key], v).item(), key
    np.testing.assert_allclose(logits(model_from(arch, config, weights)), logits(source), atol=1e-5)


@pytest.mark.parametrize("arch", CONFIGS)
def test_mixed_gguf_matches_gguf_py_dequantization(arch, tmp_path):
    """Q8_0/Q4_0/Q4_1 arrive quantized, F16 as float16, Q5_0/Q5_1 and k-quants dequantized to float16;
    the logits are those of the model built from gguf-py's dequantization of the same bytes."""
    source = random_model(arch, CONFIGS[arch])
    expected = write_gguf(tmp_path / "m.gguf", arch, CONFIGS[arch], source, MIXED, np.random.default_rng(0))
    config, weights, _ = load_gguf(tmp_path / "m.gguf")

    q = config["quantization"]
    assert (q["group_size"], q["bits"], q["model.embed_tokens"]["bits"]) == (32, 4, 8)
    assert "model.layers.0.mlp.down_proj" not in q and "model.layers.0.self_attn.o_proj" not in q
    down = weights["model.layers.0.mlp.down_proj.weight"]
    assert down.dtype == mx.float16 and down.shape == (64, 256)
    reference = reference_weights(expected, weights)
    ref_config = {k: v for k, v in config.items() if k != "quantization"}
    np.testing.assert_allclose(logits(model_from(arch, config, weights)),
                               logits(model_from(arch, ref_config, reference)), atol=1e-4, rtol=1e-4)


def test_k_quant_llama(tmp_path):
    """Every k-quant, Q5_0/Q5_1, BF16 and IQ4_NL (dequantized by gguf-py) in a llama GGUF whose rows
    are whole 256-blocks: each tensor equals gguf.quants.dequantize of its bytes, Q/K un-permuted."""
    config = dict(CONFIGS["llama"], hidden_size=256, intermediate_size=512)
    types = {"token_embd": T.Q4_K, "output": T.Q6_K, "attn_q": (T.Q2_K, T.Q8_0), "attn_k": (T.Q3_K, T.Q4_0),
             "attn_v": (T.Q5_K, T.BF16), "attn_output": (T.Q6_K, T.Q5_0), "ffn_gate": (T.Q4_K, T.Q5_1),
             "ffn_up": (T.Q5_K, T.IQ4_NL), "ffn_down": (T.Q2_K, T.Q3_K)}
    source = random_model("llama", config)
    expected = write_gguf(tmp_path / "k.gguf", "llama", config, source, types, np.random.default_rng(1))
    config, weights, _ = load_gguf(tmp_path / "k.gguf")

    assert weights["model.layers.1.self_attn.v_proj.weight"].dtype == mx.bfloat16
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == mx.float16
    assert set(config["quantization"]) == {"group_size", "bits", "model.layers.1.self_attn.k_proj"}
    reference = reference_weights(expected, weights)
    ref_config = {k: v for k, v in config.items() if k != "quantization"}
    np.testing.assert_allclose(logits(model_from("llama", config, weights)),
                               logits(model_from("llama", ref_config, reference)), atol=1e-4, rtol=1e-4)


def test_native_types_as_mx_load_reads_them(tmp_path):
    """A file MLX reads natively (F32, F16, Q4_0, Q4_1, Q8_0) loads bit for bit as mx.load gives it."""
    source = random_model("qwen2", CONFIGS["qwen2"])
    types = {"token_embd": T.Q8_0, "attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.F16, "ffn_up": T.Q8_0,
             "ffn_down": T.Q4_1}
    write_gguf(tmp_path / "n.gguf", "qwen2", CONFIGS["qwen2"], source, types, np.random.default_rng(2))
    _, weights, _ = load_gguf(tmp_path / "n.gguf")
    native = mx.load(str(tmp_path / "n.gguf"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2)
    hf = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k, _ in tree_flatten(source.parameters())}
    assert len(native) == len(weights) and weights["model.embed_tokens.scales"].dtype == mx.float16
    for name, v in native.items():
        key = hf.get(name) or hf[name.rsplit(".", 1)[0] + ".weight"].removesuffix("weight") + name.rsplit(".", 1)[1]
        assert weights[key].dtype == v.dtype and mx.array_equal(weights[key], v).item(), key


def write_llama_with(path, tensors: dict):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    tokenizer_metadata(w)
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_refusals(tmp_path):
    """An unknown tensor (Llama 3.1's RoPE factors) and a cut file: one clear line each."""
    write_llama_with(tmp_path / "rope.gguf", {"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(FlashError, match="tensor 'rope_freqs.weight' is not supported"):
        load_gguf(tmp_path / "rope.gguf")
    write_llama_with(tmp_path / "ok.gguf", {"token_embd.weight": np.ones((VOCAB, 64), np.float32)})
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "ok.gguf").read_bytes()[:-16])
    with pytest.raises(FlashError, match="cannot read GGUF file .*token_embd.weight runs past the end"):
        load_gguf(tmp_path / "cut.gguf")
