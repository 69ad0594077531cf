"""GGUF files of mixtures of experts, written as llama.cpp writes them (qwen3moe; Mixtral as a llama with
experts), converted to expert bundles and run in flash mode against mlx-lm's forward pass of the weights
the file holds.

Each test takes a tiny random checkpoint of tests/moe_models.py, loads it with mlx-lm, and writes it with
gguf-py's GGUFWriter and tensor-name map: each MoE layer's experts as three stacked tensors
(`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`), the router as `ffn_gate_inp`, Mixtral's Q/K rows
permuted for llama.cpp's RoPE. The reference is mlx-lm's model with the values the file holds (gguf-py's
dequantization of the same bytes where a tensor is quantized). The non-expert matrices stay F32 here: a
quantized resident part computes in its float16 scales' dtype (test_gguf.py covers those types).
"""

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten

from arch_models import reference_model
from moe_models import EXPERTS, make_moe, moe_config
from test_gguf import K_QUANT_SCALES, permute, random_blocks, tokenizer_metadata, unpermute
from test_moe import PROMPT, SLOTS, TOL, caches, generate_logits, prefilled_logits, relative, teacher_logits

from mlx_flash.convert import convert
from mlx_flash.errors import FlashError
from mlx_flash.expert_format import ExpertStore
from mlx_flash.flash import prefill as prefill_module
from mlx_flash.load import load_flash

TOKENS = 12
GGUF_ARCH = {"qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "mixtral": gguf.MODEL_ARCH.LLAMA, "gpt_oss": gguf.MODEL_ARCH.GPT_OSS}
# mlx-lm's stacked expert names -> the Hugging Face names gguf-py's map knows for them
HF_EXPERTS = {"qwen3_moe": {"switch_mlp.gate_proj": "experts.gate_proj", "switch_mlp.up_proj": "experts.up_proj",
                            "switch_mlp.down_proj": "experts.down_proj"},
              "mixtral": {"switch_mlp.gate_proj": "experts.w1", "switch_mlp.up_proj": "experts.w3",
                          "switch_mlp.down_proj": "experts.w2"},
              "gpt_oss": {}}  # mlx-lm's gpt-oss names are the Hub's
# gpt-oss-20b's RoPE (llama.cpp writes its type, factor and original context)
YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
        "beta_slow": 1.0}


def write_moe_gguf(path, arch: str, model, config: dict, experts=T.F32, others=T.F32, down=None) -> dict:
    """Write mlx-lm's `model` as llama.cpp would: stacked expert tensors in `experts` (the down projections in
    `down`, if given), the other matrices in `others`, norms and routers F32; k-quants (which gguf-py cannot
    quantize) as random valid blocks. Returns {mlx-lm parameter name: the values the file holds}."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(config["num_experts_per_tok"])
    if arch == "qwen3_moe":
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if arch == "gpt_oss":  # as llama.cpp's convert_hf_to_gguf.py writes gpt-oss
        w.add_expert_feed_forward_length(config["intermediate_size"])
        w.add_sliding_window(config["sliding_window"])
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(config["rope_scaling"]["factor"])
        w.add_rope_scaling_orig_ctx_len(config["rope_scaling"]["original_max_position_embeddings"])
    tokenizer_metadata(w)

    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], config["num_hidden_layers"])
    held = {}
    for key, value in tree_flatten(model.parameters()):
        hf = key
        for ours, theirs in HF_EXPERTS[arch].items():
            hf = hf.replace(ours, theirs)
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        name += ".weight" if name.endswith("attn_sinks") else ""  # llama.cpp's name for gpt-oss's sinks
        data = np.array(value)
        if arch == "mixtral" and ".attn_q." in name:
            data = permute(data, config["num_attention_heads"])
        elif arch == "mixtral" and ".attn_k." in name:
            data = permute(data, config["num_key_value_heads"])
        kind = experts if "_exps.weight" in name else T.F32 if data.ndim == 1 or "gate_inp" in name else others
        kind = down if down is not None and "ffn_down_exps.weight" in name else kind
        if kind == T.F32:
            w.add_tensor(name, data)
            held[key] = np.array(value)
            continue
        raw = random_blocks(kind, (int(np.prod(data.shape[:-1])), data.shape[-1]), rng).reshape(
            *data.shape[:-1], -1) if kind in K_QUANT_SCALES else gguf.quants.quantize(data, kind)
        w.add_tensor(name, raw, raw_dtype=kind)
        stored = gguf.quants.dequantize(raw, kind)
        if arch == "mixtral" and ".attn_q." in name:
            stored = unpermute(stored, config["num_attention_heads"])
        elif arch == "mixtral" and ".attn_k." in name:
            stored = unpermute(stored, config["num_key_value_heads"])
        held[key] = stored
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


@pytest.mark.parametrize("arch, experts, others", [("qwen3_moe", T.F32, T.F32), ("qwen3_moe", T.Q4_0, T.F32),
                                                   ("mixtral", T.Q8_0, T.F32)],
                         ids=["qwen3moe-f32", "qwen3moe-q4_0", "mixtral-q8_0"])
def test_gguf_moe_converts_to_expert_bundles(tmp_path, arch, experts, others):
    """convert reads the GGUF's stacked experts into one extent per expert (a quantized source's bits copied:
    4 or 8 bits, group 32); flash mode with 3 slots of 8 experts gives mlx-lm's logits of the file's weights."""
    overrides = {"mlp_only_layers": []} if arch == "qwen3_moe" else {}  # llama.cpp's qwen3moe: every layer MoE
    src = make_moe(tmp_path / arch, arch, **overrides)
    model = reference_model(src)
    config = {**moe_config(arch), **overrides}
    held = write_moe_gguf(tmp_path / "m.gguf", arch, model, config, experts, others)
    model.load_weights([(k, mx.array(v)) for k, v in held.items()], strict=True)
    ref = generate_logits(model, TOKENS)

    folder = convert(str(tmp_path / "m.gguf"), tmp_path / "m.flash", quiet=True)
    store = ExpertStore.load(folder)
    assert store.architecture == arch and store.num_experts == EXPERTS and len(store.moe_layers) == len(model.layers)
    bits = {T.F32: None, T.Q4_0: 4, T.Q8_0: 8}[experts]
    assert store.quantization == (bits and {"bits": bits, "group_size": 32})
    flash, _ = load_flash(folder, "flash", slots=SLOTS)
    ours = teacher_logits(flash, [int(r.argmax()) for r in ref[len(PROMPT) - 1 : -1]])
    assert relative(ours, ref) <= TOL
    assert sum(c.stats.evicted for c in caches(flash)) > 0  # the 3 slots were too few to keep every expert


@pytest.mark.parametrize("experts", [T.MXFP4, T.Q8_0], ids=["mxfp4", "q8_0"])
def test_gguf_gpt_oss(tmp_path, experts, monkeypatch):
    """gpt-oss as llama.cpp writes it (experts' and router's biases, attention sinks, sliding and full attention
    layers, YaRN RoPE), its experts MXFP4: convert keeps them as MLX's mxfp4, bit for bit (the same E2M1 codes
    and exponents, repacked: no requantization), so the extents are the file's 4.25 bits a weight; flash mode
    gives mlx-lm's logits of the file's weights (gguf-py's dequantization), over a prompt in MLX and through
    generate's numpy prefill, and over decode tokens with 3 slots of 8 experts."""
    src = make_moe(tmp_path / "gpt_oss", "gpt_oss", rope_scaling=YARN)
    model = reference_model(src)
    config = {**moe_config("gpt_oss"), "rope_scaling": YARN}
    held = write_moe_gguf(tmp_path / "m.gguf", "gpt_oss", model, config, experts)
    model.load_weights([(k, mx.array(v)) for k, v in held.items()], strict=True)
    ref = generate_logits(model, TOKENS)

    folder = convert(str(tmp_path / "m.gguf"), tmp_path / "m.flash", quiet=True)
    store = ExpertStore.load(folder)
    assert store.architecture == "gpt_oss" and store.model_config["layer_types"] == config["layer_types"]
    if experts == T.MXFP4:
        assert store.quantization == {"bits": 4, "group_size": 32, "mode": "mxfp4"}
        assert store.layout.field("gate_proj.scales").dtype == "uint8"
        d, f = config["hidden_size"], config["intermediate_size"]
        content = sum(4.25 / 8 * n for n in (f * d, f * d, d * f)) + 4 * (2 * f + d)  # mxfp4, float32 biases
        assert store.expert_bytes == content
    else:
        assert store.quantization == {"bits": 8, "group_size": 32}
    flash, _ = load_flash(folder, "flash", slots=SLOTS)
    tokens = [int(r.argmax()) for r in ref[len(PROMPT) - 1 : -1]]
    assert relative(teacher_logits(flash, tokens), ref) <= TOL
    assert sum(c.stats.evicted for c in caches(flash)) > 0
    flash, _ = load_flash(folder, "flash", slots=SLOTS)
    monkeypatch.setattr(prefill_module, "numpy_is_faster", lambda: True)  # MLX's CPU backend's path, on any device
    numpy_path = prefilled_logits(flash, PROMPT, 4, tokens)  # generate's path: the prompt's experts in numpy
    assert relative(numpy_path, ref[len(PROMPT) - 1 :]) <= TOL


def test_gguf_k_quant_experts(tmp_path, monkeypatch):
    """Q4_K_M's experts (gate and up Q4_K, down Q6_K; 256-value blocks, so d_model and the experts' width are
    256): they arrive dequantized to float16 (gguf.py) and are stored float16, as the README says; flash mode
    with 3 slots of 8 experts, and the prompt through generate's numpy prefill, give mlx-lm's logits of those
    float16 values. `--quantize 4` stores them at 4 bits instead: flash equals the folder's dense mode."""
    overrides = {"mlp_only_layers": [], "hidden_size": 256, "moe_intermediate_size": 256}
    src = make_moe(tmp_path / "q", "qwen3_moe", **overrides)
    model = reference_model(src)
    config = {**moe_config("qwen3_moe"), **overrides}
    held = write_moe_gguf(tmp_path / "m.gguf", "qwen3_moe", model, config, T.Q4_K, down=T.Q6_K)
    held = {k: v.astype(np.float16).astype(np.float32) if "switch_mlp" in k else v for k, v in held.items()}
    model.load_weights([(k, mx.array(v)) for k, v in held.items()], strict=True)
    ref = generate_logits(model, TOKENS)
    tokens = [int(r.argmax()) for r in ref[len(PROMPT) - 1 : -1]]

    folder = convert(str(tmp_path / "m.gguf"), tmp_path / "m.flash", quiet=True)
    store = ExpertStore.load(folder)
    assert store.quantization is None and store.dtype == "float16"
    assert store.expert_bytes == 3 * 256 * 256 * 2
    flash, _ = load_flash(folder, "flash", slots=SLOTS)
    assert relative(teacher_logits(flash, tokens), ref) <= TOL
    assert sum(c.stats.evicted for c in caches(flash)) > 0
    flash, _ = load_flash(folder, "flash", slots=SLOTS)
    monkeypatch.setattr(prefill_module, "numpy_is_faster", lambda: True)  # MLX's CPU backend's path, on any device
    assert relative(prefilled_logits(flash, PROMPT, 4, tokens), ref[len(PROMPT) - 1 :]) <= TOL

    q4 = convert(str(tmp_path / "m.gguf"), tmp_path / "m4.flash", quantize=4, group_size=32, quiet=True)
    assert ExpertStore.load(q4).quantization == {"bits": 4, "group_size": 32}
    dense = generate_logits(load_flash(q4, "dense")[0], TOKENS)
    flash, _ = load_flash(q4, "flash", slots=SLOTS)
    assert relative(teacher_logits(flash, [int(r.argmax()) for r in dense[len(PROMPT) - 1 : -1]]), dense) <= TOL


def test_gguf_moe_refusals(tmp_path):
    """An old Mixtral GGUF (one tensor per expert) and a qwen3moe file without its top-k: one line each."""
    old = gguf.GGUFWriter(str(tmp_path / "old.gguf"), "llama")
    new = gguf.GGUFWriter(str(tmp_path / "new.gguf"), "qwen3moe")
    for w, name in ((old, "blk.0.ffn_gate.3.weight"), (new, "blk.0.ffn_gate_exps.weight")):
        w.add_embedding_length(64)
        w.add_block_count(1)
        w.add_feed_forward_length(32)
        w.add_head_count(4)
        w.add_expert_count(8)
        if w is old:
            w.add_expert_used_count(2)
        tokenizer_metadata(w)
        w.add_tensor(name, np.zeros((8, 32, 64) if "exps" in name else (32, 64), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    old_gguf = str(tmp_path / "old.gguf")
    with pytest.raises(FlashError, match="GGUF tensor 'blk.0.ffn_gate.3.weight' is not supported"):
        convert(old_gguf, tmp_path / "old.flash", quiet=True)
    with pytest.raises(FlashError, match="lacks qwen3moe.expert_used_count"):
        convert(str(tmp_path / "new.gguf"), tmp_path / "new.flash", quiet=True)
    assert not (tmp_path / "old.flash").exists() and not (tmp_path / "new.flash").exists()
