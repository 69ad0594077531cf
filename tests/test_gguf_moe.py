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
from test_gguf import permute, tokenizer_metadata, unpermute
from test_moe import PROMPT, SLOTS, TOL, caches, generate_logits, relative, teacher_logits

from mlx_flash.convert import convert
from mlx_flash.errors import FlashError
from mlx_flash.expert_format import ExpertStore
from mlx_flash.load import load_flash

TOKENS = 12
GGUF_ARCH = {"qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "mixtral": gguf.MODEL_ARCH.LLAMA}
# mlx-lm's stacked expert names -> the Hugging Face names gguf-py's map knows for them
HF_EXPERTS = {"qwen3_moe": {"switch_mlp.gate_proj": "experts.gate_proj", "switch_mlp.up_proj": "experts.up_proj",
                            "switch_mlp.down_proj": "experts.down_proj"},
              "mixtral": {"switch_mlp.gate_proj": "experts.w1", "switch_mlp.up_proj": "experts.w3",
                          "switch_mlp.down_proj": "experts.w2"}}


def write_moe_gguf(path, arch: str, model, config: dict, experts=T.F32, others=T.F32) -> dict:
    """Write mlx-lm's `model` as llama.cpp would: stacked expert tensors in `experts`, the other matrices
    in `others`, norms and routers F32. Returns {mlx-lm parameter name: the values the file holds}."""
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
    tokenizer_metadata(w)

    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], config["num_hidden_layers"])
    held = {}
    for key, value in tree_flatten(model.parameters()):
        hf = key
        for ours, theirs in HF_EXPERTS[arch].items():
            hf = hf.replace(ours, theirs)
        name = names.get_name(hf, try_suffixes=(".weight",))
        data = np.array(value)
        if arch == "mixtral" and ".attn_q." in name:
            data = permute(data, config["num_attention_heads"])
        elif arch == "mixtral" and ".attn_k." in name:
            data = permute(data, config["num_key_value_heads"])
        kind = experts if "_exps." in name else T.F32 if data.ndim == 1 or "gate_inp" in name else others
        if kind == T.F32:
            w.add_tensor(name, data)
            held[key] = np.array(value)
            continue
        raw = gguf.quants.quantize(data, kind)
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
