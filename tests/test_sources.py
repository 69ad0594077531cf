"""Sources as users have them: mlx-community quantized checkpoints converted without touching their
resident bits, within --dram-budget, and the FFN rows taken from the quantized source where they can be."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from arch_models import make_arch
from mlx_flash.convert import convert
from mlx_flash.errors import FlashError
from mlx_flash.format import RESIDENT_FILE, FlashConfig
from mlx_flash.load import load

# wide enough for bundles to be mostly content (not alignment padding), deep enough for the FFN to outweigh
# the resident part as in real models: 12 layers of 3 x 1024 x 2048
DEEP = dict(num_hidden_layers=12, hidden_size=1024, intermediate_size=2048, num_attention_heads=8, head_dim=128)


@pytest.fixture(scope="module")
def community(tmp_path_factory):
    """An mlx-community-style 4-bit, group-64 Qwen3 made by mlx-lm's own converter from a bfloat16 folder."""
    return make_arch(tmp_path_factory.mktemp("mc") / "qwen3-4bit", "qwen3", quantized=True, bits=4, group_size=64,
                     dtype="bfloat16", **DEEP)


def source_tensors(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def convert_needs(folder) -> int:
    """The budget convert asks for, as its one-line refusal of a tiny budget says it."""
    import re

    try:
        convert(str(folder), folder.parent / "never", dram_budget="1K", quiet=True)
    except FlashError as e:
        return int(float(re.search(r"need ([\d.]+) MB", str(e)).group(1)) * 1e6)
    raise AssertionError("a budget of 1 KiB was accepted")


def test_resident_bits_are_the_sources_and_memory_stays_within_the_budget(community, tmp_path):
    src = source_tensors(community)
    ffn = sum(v.nbytes for k, v in src.items() if ".mlp." in k)
    resident = sum(v.nbytes for k, v in src.items() if ".mlp." not in k)
    budget = int(0.8 * (resident + ffn))  # less than the model
    assert budget > convert_needs(community)
    out = tmp_path / "flash"
    # in a process of its own, so that MLX's peak is convert's alone
    code = ("import sys, mlx.core as mx; from mlx_flash.convert import convert; "
            "convert(sys.argv[1], sys.argv[2], dram_budget=int(sys.argv[3]), quiet=True); print(mx.get_peak_memory())")
    r = subprocess.run([sys.executable, "-c", code, str(community), str(out), str(budget)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split()[-1])
    assert peak <= budget, f"convert peaked at {peak} bytes over a budget of {budget}"

    kept = mx.load(str(out / RESIDENT_FILE))
    assert set(kept) == {k for k in src if ".mlp." not in k}
    for k, v in kept.items():  # bit for bit: nothing dequantized or requantized
        assert v.dtype == src[k].dtype and np.array_equal(np.array(v.view(mx.uint8)), np.array(src[k].view(mx.uint8))), k
    assert sum(v.nbytes for v in kept.values()) == resident

    cfg = FlashConfig.load(out)
    assert cfg.quantization["bits"] == 4 and cfg.quantization["group_size"] == 64
    req = cfg.source["requantization"]
    assert "gate_requantized" not in req and "up_requantized" not in req  # gate/up rows copied exactly
    assert 0 < req["down_relative_error_max"] < 0.02  # down columns at 8 bits


def test_gate_and_up_rows_are_the_sources_bits(community, tmp_path):
    out = convert(str(community), tmp_path / "flash", quiet=True)
    src = source_tensors(community)
    model, _ = load(str(out), mode="dense")
    for l, layer in enumerate(model.layers):
        fields = layer.mlp.fields
        for name in ("gate", "up"):
            for part, got in zip(("weight", "scales", "biases"), fields[name]):
                want = src[f"model.layers.{l}.mlp.{name}_proj.{part}"]
                assert np.array_equal(np.array(got.view(mx.uint8)), np.array(want.view(mx.uint8))), (l, name, part)


def test_a_budget_below_the_resident_part_and_one_layer_is_refused_in_one_line(community, tmp_path):
    src = source_tensors(community)
    resident = sum(v.nbytes for k, v in src.items() if ".mlp." not in k)
    with pytest.raises(FlashError, match="cannot convert this model: resident weights") as e:
        convert(str(community), tmp_path / "flash", dram_budget=resident, quiet=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "flash").exists()  # nothing half-written


def test_per_layer_overrides_requantize_only_the_layers_that_differ(tmp_path):
    """A checkpoint whose layer 1 gate/up are at 8 bits while the rest are at 4 (a per-module entry in
    `quantization`, as mlx-lm writes for mixed recipes): bundles hold 4 bits, layer 1's rows are
    requantized, and convert says which and at what error."""
    src = make_arch(tmp_path / "mixed", "llama", quantized=True, bits=4, group_size=32,
                    quant_predicate=lambda path, _: {"group_size": 32, "bits": 8}
                    if path in ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj") else True)
    q = json.loads((src / "config.json").read_text())["quantization"]
    assert q["model.layers.1.mlp.gate_proj"]["bits"] == 8
    out = convert(str(src), tmp_path / "flash", quiet=True)
    req = FlashConfig.load(out).source["requantization"]
    assert set(req["gate_requantized"]) == {"1"} and set(req["up_requantized"]) == {"1"}
    assert 0 < req["gate_requantized"]["1"] < 0.2  # 8 -> 4 bits: a 4-bit quantization's error
    ids = mx.array(list(range(3, 30, 2)))[None]
    want = load(str(src))[0](ids)
    got = load(str(out), mode="dense")[0](ids)
    rel = float(mx.abs(got - want).max() / mx.abs(want).max())
    assert rel < 0.2, rel


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (6, 128), (8, 64)])
def test_quantized_sources_of_every_width_convert_and_match_their_dense_logits(tmp_path, bits, group):
    src = make_arch(tmp_path / "q", "qwen3", quantized=True, bits=bits, group_size=group, hidden_size=128,
                    num_attention_heads=4, head_dim=32)
    out = convert(str(src), tmp_path / "flash", quiet=True)
    cfg = FlashConfig.load(out)
    assert (cfg.quantization["bits"], cfg.quantization["group_size"]) == (bits, group)
    ids = mx.array(list(range(3, 30, 2)))[None]
    want = load(str(src))[0](ids)
    got = load(str(out), mode="dense")[0](ids)
    # the only difference: down columns requantized at max(8, bits) bits along d_model
    rel = float(mx.abs(got - want).max() / mx.abs(want).max())
    assert rel < 0.05, rel


def test_a_quantization_mode_other_than_affine_is_refused_in_one_line(tmp_path, community):
    import shutil

    bad = tmp_path / "mxfp4"
    shutil.copytree(community, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization"]["mode"] = "mxfp4"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashError, match=r"quantization mode 'mxfp4' of \S+ is not supported .*for routed experts"):
        load(str(bad))
