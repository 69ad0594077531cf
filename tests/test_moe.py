"""Mixture-of-experts models with their experts streamed from SSD (expert_format, convert_experts,
flash/expert_cache, flash/experts, flash/expert_attach), held against mlx-lm's own forward pass on tiny
random checkpoints of every MoE architecture in the table, float and quantized."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from arch_models import reference_model
from flash_fixtures import direct_root  # noqa: F401  (fixture)
from moe_models import EXPERTS, MOE_ARCHS, TOP_K, make_moe

from mlx_flash.convert import convert
from mlx_flash.errors import FlashError
from mlx_flash.expert_format import EXPERTS_FILE, ExpertStore
from mlx_flash.flash import prefill as prefill_module
from mlx_flash.flash.expert_cache import ExpertCache
from mlx_flash.flash.prefill import prefill
from mlx_flash.load import load_flash

SLOTS = 3  # fewer than the 8 experts, more than a token's 2
PROMPT = [1, 40, 7, 300, 12, 99]
TOKENS = 32
TOL = 1e-4  # max relative difference of the logits, float32


@pytest.fixture(scope="module")
def moe(direct_root):
    """moe(arch, quantized, **convert_options) -> (source folder, converted folder), made once."""
    made = {}

    def get(arch, quantized=False, **opts):
        key = (arch, quantized, tuple(sorted(opts.items())))
        if key not in made:
            name = f"{arch}-{'q' if quantized else 'f'}-{len(made)}"
            src = direct_root / name
            if not src.exists():
                make_moe(src, arch, quantized=quantized)
            made[key] = src, convert(str(src), direct_root / f"{name}.flash", quiet=True, **opts)
        return made[key]

    return get


def generate_logits(model, tokens: int = TOKENS) -> np.ndarray:
    """(prompt + tokens, vocab) logits: the prompt in one pass, then greedy decoding one token at a time."""
    cache = make_prompt_cache(model)
    out = [np.array(model(mx.array(PROMPT)[None], cache=cache)[0])]
    for _ in range(tokens):
        out.append(np.array(model(mx.array([[int(out[-1][-1].argmax())]]), cache=cache)[0]))
    return np.concatenate(out)


def teacher_logits(model, ids: list) -> np.ndarray:
    """The same positions as generate_logits, fed the given tokens (so that two models see one sequence)."""
    cache = make_prompt_cache(model)
    out = [np.array(model(mx.array(PROMPT)[None], cache=cache)[0])]
    for t in ids:
        out.append(np.array(model(mx.array([[t]]), cache=cache)[0]))
    return np.concatenate(out)


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def flash_layers(model) -> list:
    return [m for _, m in model.named_modules() if type(m).__name__ == "FlashExperts"]


def caches(model) -> list:
    return [m.cache for m in flash_layers(model)]


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "q4"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_flash_experts_equal_mlx_lm(moe, arch, quantized):
    """Over a prompt and a 32-token generation with 3 slots of 8 experts: the logits are mlx-lm's; the reads
    are the misses times an extent; the slot buffers are the ones allocated at load."""
    src, folder = moe(arch, quantized)
    ref = generate_logits(reference_model(src))
    model, store = load_flash(folder, "flash", slots=SLOTS, prompt_mode="window")  # reads: the window's misses
    buffers = [(c.buffer, c.buffer.addresses) for c in caches(model)]
    ours = teacher_logits(model, [int(r.argmax()) for r in ref[len(PROMPT) - 1 : -1]])
    assert relative(ours, ref) <= TOL
    assert all(c.slots == SLOTS < EXPERTS for c in caches(model)) and len(caches(model)) == len(store.moe_layers)
    misses = sum(c.stats.misses for c in caches(model))
    assert misses > 0 and model.flash_reader.stats.bytes_read == misses * store.layout.stride
    assert sum(c.stats.evicted for c in caches(model)) > 0  # the slots were too few to keep every expert
    assert all(buf.addresses == before for buf, before in buffers)  # never reallocated
    snap = model.flash_stats.snapshot()
    assert snap["decode_tokens"] == TOKENS and 0 < snap["expert_hit_rate"] < 1
    assert snap["bytes_read_per_token"] == snap["experts_read_per_token"] * store.layout.stride


def test_slots_are_the_switch_weights(moe):
    """mlx-lm's SwitchGLU computes on the slot buffer itself: its weights share the buffer's memory."""
    _, folder = moe("qwen3_moe", True)
    model, _ = load_flash(folder, "flash", slots=SLOTS)
    layer = next(m for _, m in model.named_modules() if type(m).__name__ == "FlashExperts")
    weight = layer.glu.gate_proj.weight
    assert weight.shape[0] == SLOTS
    assert np.array(memoryview(weight), copy=False).ctypes.data in layer.cache.buffer.addresses


def test_quantized_at_convert_equals_dense(moe):
    """A float source quantized by convert --quantize 4: flash equals the folder's dense mode."""
    _, folder = moe("mixtral", False, quantize=4, group_size=32)
    store = ExpertStore.load(folder)
    assert store.quantization == {"bits": 4, "group_size": 32} and store.layout.field("up_proj.scales")
    dense, _ = load_flash(folder, "dense")
    ref = generate_logits(dense, 12)
    model, _ = load_flash(folder, "flash", slots=TOP_K)
    assert relative(teacher_logits(model, [int(r.argmax()) for r in ref[len(PROMPT) - 1 : -1]]), ref) <= TOL


def test_prompt_in_groups_that_fit_the_slots(moe):
    """A prompt whose experts outnumber the slots runs in groups of tokens, each a window step, and equals
    mlx-lm's forward pass."""
    src, folder = moe("mixtral")
    ids = np.random.default_rng(0).integers(3, 500, 24).tolist()
    ref = np.array(reference_model(src)(mx.array(ids)[None])[0])
    model, _ = load_flash(folder, "flash", slots=TOP_K, prompt_mode="window")
    assert relative(np.array(model(mx.array(ids)[None])[0]), ref) <= TOL
    assert all(c.stats.steps > 3 for c in caches(model))
    assert model.flash_stats.prompt_tokens == len(ids) and model.flash_stats.prompt_experts_read > 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_prompt_pass_reads_each_expert_once(moe, arch):
    """A prompt as one pass over its experts: each of a layer's routed experts read once, in expert order,
    through the pass's staging halves; the logits are mlx-lm's, and so are the decode tokens after it (the
    slots were refilled with the prompt's last experts as they passed)."""
    src, folder = moe(arch, True)
    ref = generate_logits(reference_model(src), 8)
    model, store = load_flash(folder, "flash", slots=SLOTS, prompt_mode="pass")
    passing, reads = flash_layers(model)[0].passing, {}
    read = passing._read
    passing._read = lambda layer, experts, half: (reads.setdefault(layer, []).extend(experts), read(layer, experts,
                                                                                                    half))[1]
    ours = teacher_logits(model, [int(r.argmax()) for r in ref[len(PROMPT) - 1 : -1]])
    assert relative(ours, ref) <= TOL
    s = model.flash_stats
    assert s.prompt_passes == len(store.moe_layers) and s.prompt_groups == 0 and s.prompt_mode() == "pass"
    assert sorted(reads) == store.moe_layers and all(np.all(np.diff(e) > 0) for e in reads.values())  # once, sorted
    n = sum(len(e) for e in reads.values())
    assert s.prompt_experts_read == n > len(store.moe_layers) * SLOTS
    assert s.prompt_bytes_read == n * store.layout.stride
    assert model.flash_plan.prompt_staging > 0 and model.flash_plan.pass_rows == TOP_K // 2


def test_prompt_mode_auto_takes_the_fewer_reads(moe):
    """A prompt in two chunks (the second finds experts in the slots, computed there): every mode gives
    mlx-lm's logits. auto: where the experts outnumber the slots, a pass (fewer reads than groups, which
    read evicted experts again); with a slot for every expert, groups (one each)."""
    src, folder = moe("mixtral")
    ids = mx.array(np.random.default_rng(1).integers(3, 500, 32).tolist())[None]

    def two_chunks(model):
        cache = make_prompt_cache(model)
        return np.concatenate([np.array(model(ids[:, :16], cache=cache)[0]), np.array(model(ids[:, 16:], cache=cache)[0])])

    ref = two_chunks(reference_model(src))
    few, _ = load_flash(folder, "flash", slots=TOP_K)
    window, _ = load_flash(folder, "flash", slots=TOP_K, prompt_mode="window")
    passing, _ = load_flash(folder, "flash", slots=SLOTS, prompt_mode="pass")
    every, _ = load_flash(folder, "flash", slots=EXPERTS)
    for m in (few, window, passing, every):
        assert relative(two_chunks(m), ref) <= TOL
    assert few.flash_stats.prompt_passes == 4 and every.flash_stats.prompt_groups == 4
    assert few.flash_stats.prompt_experts_read < window.flash_stats.prompt_experts_read


def prefilled_logits(model, ids: list, chunk: int, tokens: list) -> np.ndarray:
    """Generate's path: all but the last of `ids` through flash.prefill (`chunk` tokens per forward pass),
    MLX's gather_qmm and gather_mm refused meanwhile (the experts must multiply in numpy); then the last
    token and `tokens` one at a time: (1 + len(tokens), vocab) logits."""
    def refused(*args, **kwargs):
        raise AssertionError("a prompt's experts went through MLX's gather_qmm / gather_mm")

    cache = make_prompt_cache(model)
    gather = mx.gather_qmm, mx.gather_mm
    mx.gather_qmm = mx.gather_mm = refused
    try:
        prefill(model, cache, ids[:-1], chunk)
    finally:
        mx.gather_qmm, mx.gather_mm = gather
    out = [np.array(model(mx.array(ids[-1:])[None], cache=cache)[0])]
    out += [np.array(model(mx.array([[t]]), cache=cache)[0]) for t in tokens]
    return np.concatenate(out)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "q4"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_prompt_experts_multiply_in_numpy(moe, arch, quantized, monkeypatch):
    """On MLX's CPU backend (forced here, whatever the device) a prompt's experts multiply in numpy, expert by
    expert (flash.expert_numpy): in dense mode, in groups and in one pass over the experts, in chunks of 7
    tokens (the second chunk finds experts in the slots); the prompt's last logits and the decode tokens
    after it are mlx-lm's."""
    monkeypatch.setattr(prefill_module, "numpy_is_faster", lambda: True)
    src, folder = moe(arch, quantized)
    ids = np.random.default_rng(2).integers(3, 500, 15).tolist()
    ref_model = reference_model(src)
    cache = make_prompt_cache(ref_model)
    ref = [np.array(ref_model(mx.array(ids)[None], cache=cache)[0, -1:])]
    for _ in range(4):
        ref.append(np.array(ref_model(mx.array([[int(ref[-1][-1].argmax())]]), cache=cache)[0]))
    ref = np.concatenate(ref)
    tokens = [int(r.argmax()) for r in ref[:-1]]
    dense, _ = load_flash(folder, "dense")
    assert relative(prefilled_logits(dense, ids, 7, tokens), ref) <= TOL
    for mode in ("window", "pass"):
        model, _ = load_flash(folder, "flash", slots=SLOTS, prompt_mode=mode)
        assert relative(prefilled_logits(model, ids, 7, tokens), ref) <= TOL, mode
        s = model.flash_stats
        assert (s.prompt_passes if mode == "pass" else s.prompt_groups) == 2 * len(caches(model))
        assert s.prompt_experts_read > 0 and s.decode_tokens == 1 + len(tokens)
    assert relative(prefilled_logits(ref_model, ids, 7, tokens), ref) <= TOL  # mlx-lm's own SwitchGLU, swapped


def test_mxfp4_experts_as_mlx_lm_quantizes_gpt_oss(direct_root, monkeypatch):
    """gpt-oss as mlx-community ships it: experts in MLX's mxfp4, the rest 8-bit affine (mlx-lm's converter with
    a per-module predicate). convert copies the experts' bits (uint8 E8M0 scales, no biases) and keeps the
    mode; flash mode gives mlx-lm's logits, decoding (gather_qmm, mxfp4) and through the numpy prefill."""
    def mxfp4_experts(path, module):
        mode = "mxfp4" if ".experts." in path else "affine"
        return {"group_size": 32, "bits": 4 if mode == "mxfp4" else 8, "mode": mode}

    src = make_moe(direct_root / "gpt_oss-mxfp4", "gpt_oss", quantized=True, quant_predicate=mxfp4_experts)
    folder = convert(str(src), direct_root / "gpt_oss-mxfp4.flash", quiet=True)
    store = ExpertStore.load(folder)
    assert store.quantization == {"bits": 4, "group_size": 32, "mode": "mxfp4"}
    assert store.layout.field("down_proj.scales").dtype == "uint8" and not any(
        f.name.endswith(".biases") for f in store.layout.fields)
    ref_model = reference_model(src)
    ref = generate_logits(ref_model, 8)
    tokens = [int(r.argmax()) for r in ref[len(PROMPT) - 1 : -1]]
    model, _ = load_flash(folder, "flash", slots=SLOTS)
    assert relative(teacher_logits(model, tokens), ref) <= TOL
    monkeypatch.setattr(prefill_module, "numpy_is_faster", lambda: True)
    model, _ = load_flash(folder, "flash", slots=SLOTS, prompt_mode="pass")
    assert relative(prefilled_logits(model, PROMPT, 4, tokens), ref[len(PROMPT) - 1 :]) <= TOL


@pytest.mark.parametrize("mode", ["pass", "window"])
def test_numpy_prompt_stays_within_the_planned_working_memory(moe, mode, monkeypatch):
    """What numpy allocates for a prompt's chunk (tracemalloc sees numpy's buffers: dequantized experts, the
    pairs' inputs and outputs, the attention's float32 copies) stays within the plan's working memory, which
    counts an expert's float32 weights and the chunk's pairs (flash.budget.numpy_expert_bytes)."""
    import tracemalloc

    from mlx_flash.flash import budget

    monkeypatch.setattr(prefill_module, "numpy_is_faster", lambda: True)
    monkeypatch.setattr(budget, "numpy_is_faster", lambda: True)
    _, folder = moe("gpt_oss", True)
    model, store = load_flash(folder, "flash", slots=SLOTS, prompt_mode=mode, prefill_step=16)
    ids = np.random.default_rng(3).integers(3, 500, 33).tolist()
    prefill(model, make_prompt_cache(model), ids[:17], 16)  # first use: threadpoolctl's imports
    tracemalloc.start()
    try:
        prefill(model, make_prompt_cache(model), ids[:-1], 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pl = model.flash_plan
    assert pl.prefill_step == 16 and 3 * 4 * store.d_model * store.d_ff < peak <= pl.working


def test_numpy_activations_are_mlx_lm_s():
    """SwiGLU and gpt-oss's clamped SwigluOAI in numpy, on values beyond the clamp, equal mlx-lm's."""
    from mlx_lm.models.activations import SwigluOAI
    from mlx_lm.models.switch_layers import SwiGLU

    from mlx_flash.flash.expert_numpy import activation

    rng = np.random.default_rng(0)
    u, g = (rng.uniform(-20, 20, (16, 64)).astype(np.float32) for _ in range(2))
    for act in (SwiGLU(), SwigluOAI(), SwigluOAI(alpha=1.0, limit=3.0)):
        want = np.array(act(mx.array(u), mx.array(g)))
        got = activation(act, u.copy(), g.copy())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lookahead_changes_where_bytes_come_from_not_the_output(moe):
    src, folder = moe("qwen3_moe")
    plain, _ = load_flash(folder, "flash", slots=SLOTS)
    ahead, _ = load_flash(folder, "flash", slots=SLOTS, prefetch=True)
    a = generate_logits(plain, 16)
    b = teacher_logits(ahead, [int(r.argmax()) for r in a[len(PROMPT) - 1 : -1]])
    assert np.array_equal(a, b)
    s, stride = ahead.flash_stats, ExpertStore.load(folder).layout.stride
    assert s.prefetched > 0 and s.prefetch_hits + s.prefetch_wasted == s.prefetched
    read_by_layers = s.needed - s.hits - s.prefetch_hits  # misses the prefetch did not cover
    assert s.bytes_read == (read_by_layers + s.prefetched) * stride
    snap = s.snapshot()
    assert 0 <= snap["prefetch_hit_rate"] <= 1 and snap["prefetch_wasted_mb_per_token"] >= 0


def test_expert_cache_evicts_least_recently_used_outside_the_window():
    c = ExpertCache(experts=8, slots=3, window=1)
    for experts in ([0, 1], [2], [0, 3]):  # the last evicts 1, the least recently used not needed now
        new, slots = c.step(np.array(experts))
        c.commit()
    assert sorted(c.expert_in.tolist()) == [0, 2, 3] and c.slot_of[1] == -1
    assert c.stats.hits == 1 and c.stats.misses == 4 and c.stats.evicted == 1
    assert c.stats.window_evictions == 0  # 1 was last used two tokens ago, outside the window of 1
    c.step(np.array([[4, 5]]))  # one token: evicts 2 (used at token 2, in the window) and 0
    assert c.stats.window_evictions == 1
    c.abort()  # the read failed: its experts stay out, their slots free
    assert c.n == 1 and (c.slot_of[[4, 5]] == -1).all()


def test_budget_plan_smallest_and_refusal(moe):
    _, folder = moe("qwen3_moe", True)
    model, _ = load_flash(folder, "flash", dram_budget=None)
    pl = model.flash_plan
    assert pl.slots == EXPERTS and pl.total == pl.resident + pl.kv_cache + pl.working + pl.staging + \
        pl.prompt_staging + pl.buffers
    assert 0 < flash_layers(model)[0].passing.nbytes <= pl.prompt_staging  # the prompt pass's halves are planned
    smallest, _ = load_flash(folder, "flash", dram_budget=str(pl.smallest))
    assert smallest.flash_plan.slots == TOP_K and smallest.flash_plan.total <= pl.smallest
    with pytest.raises(FlashError, match=r"the smallest budget is .* MB \(\d+% of the model's") as e:
        load_flash(folder, "flash", dram_budget=str(pl.smallest - 1))
    assert "\n" not in str(e.value) and f"{pl.smallest / 1e6:.1f} MB" in str(e.value)


def run_generate(*args):
    p = subprocess.run([sys.executable, "-m", "mlx_flash.generate", *args], capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_generate_reports_experts_and_catches_a_corrupt_extent(moe, tmp_path):
    _, folder = moe("gpt_oss", True)
    rc, out, err = run_generate("--model", str(folder), "--mode", "flash", "-p", "hi", "-m", "4")
    assert rc == 0, err
    assert "experts read/token, expert hit rate" in err.strip().splitlines()[-1]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    store = ExpertStore.load(bad)
    with open(bad / EXPERTS_FILE, "r+b") as f:  # every expert of the first MoE layer gets one flipped byte
        for e in range(store.num_experts):
            f.seek(store.extents().bundle_offset(store.moe_layers[0], e) + 10)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x55]))
    rc, out, err = run_generate("--model", str(bad), "--mode", "flash", "-p", "hi", "-m", "2")
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"corrupted expert extent: layer {store.moe_layers[0]} expert" in err and "checksum" in err


def test_wrong_use_is_one_line(moe, tmp_path):
    src, folder = moe("mixtral")
    with pytest.raises(FlashError, match="a token needs its 2 experts at once"):
        load_flash(folder, "flash", slots=1)
    with pytest.raises(FlashError, match="router is exact"):
        load_flash(folder, "flash", recall=0.9)
    with pytest.raises(FlashError, match="apply to neuron bundles"):
        convert(str(src), tmp_path / "x", down_bits=4, quiet=True)
    assert not (tmp_path / "x").exists()
    p = subprocess.run([sys.executable, "-m", "mlx_flash.train_predictors", "--model", str(folder)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "mixture-of-experts" in p.stderr and "Traceback" not in p.stderr
    cfg = json.loads((folder / "flash.json").read_text())
    assert cfg["experts"]["layers"][0]["sha256"] and cfg["experts"]["file_size"] % 4096 == 0
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with open(copy / EXPERTS_FILE, "r+b") as f:  # a truncated copy
        f.truncate(cfg["experts"]["file_size"] - 4096)
    with pytest.raises(FlashError, match=f"{EXPERTS_FILE} is truncated or corrupt"):
        load_flash(copy, "flash")
    (copy / EXPERTS_FILE).unlink()
    with pytest.raises(FlashError, match=f"is incomplete: {EXPERTS_FILE} is missing"):
        load_flash(copy, "dense")


def test_evaluate_and_server_report_experts(moe):
    """evaluate: flash experts are dense's answers exactly, with the hit rate; the server's `flash` field
    carries the expert statistics."""
    import threading
    import urllib.request

    from mlx_flash.evaluate import evaluate, markdown
    from mlx_flash.load import load
    from mlx_flash.server import Engine, make_server

    _, folder = moe("qwen3_moe", True)
    r = evaluate(folder, tokens=12, starts=0, greedy_tokens=3, progress=False, configs=[{"slots": SLOTS}])
    f = r["flash"][0]
    assert f["perplexity_vs_dense"] == 0 and f["agreement"] == 1 and f["greedy"]["identical"] == 6
    assert "experts, hit rate" in markdown(r) and f["stats"]["experts_read_per_token"] > 0

    model, tokenizer = load(str(folder), mode="flash", slots=SLOTS)
    httpd = make_server(Engine(model, tokenizer, folder.name, "flash", 100), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        body = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
        req = urllib.request.Request(httpd.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            flash = json.loads(resp.read())["flash"]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert 0 <= flash["expert_hit_rate"] <= 1 and flash["experts_read_per_token"] >= 0 and "mb_read_per_token" in flash


def test_moe_benchmark_rows_on_a_tiny_geometry(tmp_path):
    """bench.moe end to end on the tiny geometry: every row runs at one budget (in a child process each),
    the routing process realizes the locality asked for, flash reads fewer experts than naive mmap; the
    prompt rows run a prompt in groups and as a pass."""
    from mlx_flash.bench.moe import ROWS, Routing, main, report

    out = tmp_path / "moe.json"
    main(["--geometry", "tiny", "--layers", "4", "--share", "400%", "--tokens", "2", "--settle", "2", "--repeats", "1",
          "--rows", ",".join(ROWS + ("prompt-groups", "prompt-pass")), "--prompt-tokens", "16",
          "--no-cgroup", "--quiet", "--dir", str(tmp_path / "m"), "--json", str(out)])
    r = json.loads(out.read_text())
    s = r["summary"]
    assert set(s) == {*ROWS, "prompt-groups", "prompt-pass"} and all(a["fits"] for a in s.values())
    groups, passing = s["prompt-groups"], s["prompt-pass"]
    assert (groups["passes"], groups["groups"], passing["passes"], passing["groups"]) == (0, 4, 4, 0)
    assert 0 < passing["experts_read"] <= groups["experts_read"] and passing["ms_prompt"] > 0
    assert "| prompt-pass |" in report(r)
    assert s["naive"]["experts_read_per_token"] == 4 * 16  # every expert of every MoE layer
    assert s["pagecache"]["experts_read_per_token"] == 4 * 2  # every routed expert
    assert s["flash"]["experts_read_per_token"] < 4 * 2 and 0 < s["flash"]["hit_rate"] < 1
    assert s["flash+lookahead"]["prefetch_hit_rate"] > 0
    routing = Routing([0], 128, 8, reuse=0.4, recent=0.8, skew=0.0, seed=1)
    for _ in range(300):
        routing.advance(1)
    assert abs(routing.summary()["from_previous"] - 0.4) < 0.05 and abs(routing.summary()["within_8"] - 0.8) < 0.05


def test_prepare_converts_without_calibrating(moe, tmp_path, capsys):
    from mlx_flash.prepare import main

    src, _ = moe("mixtral")
    main(["--model", str(src), "--out", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert "with top-k expert slots per MoE layer" in out and ExpertStore.load(tmp_path / "p").num_experts == EXPERTS
    with pytest.raises(SystemExit) as e:
        main(["--model", str(src), "--estimate"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --estimate does not size mixtures of experts")


def test_a_layer_quantized_otherwise_is_requantized_and_reported(direct_root, capsys):
    """mlx-lm's mixed_3_6 recipe puts the last MoE layer's down projections at 6 bits: convert stores them at the
    extents' 3 bits, says so with the error, and keeps it in flash.json."""
    src = make_moe(direct_root / "mixed", "qwen3_moe", quantized=True, bits=3, quant_predicate="mixed_3_6")
    out = convert(str(src), direct_root / "mixed.flash")
    printed = capsys.readouterr().out
    err = ExpertStore.load(out).source["requantized"]["2"]["down_proj"]
    assert "layer 2: down_proj quantized otherwise in the source" in printed and 0 < err < 0.5
    model, _ = load_flash(out, "flash", slots=SLOTS)
    ref = generate_logits(reference_model(src), 4)
    assert relative(teacher_logits(model, [int(r.argmax()) for r in ref[len(PROMPT) - 1 : -1]]), ref) < 0.5
