"""Bad input: one clear line on stderr, a non-zero exit, no traceback, no half-written folder."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_flash.format import BUNDLES_FILE, CONFIG_FILE


def run(*args, stdin=None):
    p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, input=stdin, timeout=300)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, err, *words):
    assert rc != 0
    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], err


def generate(model, *extra):
    return run("mlx_flash.generate", "--model", str(model), "--max-tokens", "2", *extra)


@pytest.fixture
def copy_of(tiny_flash, tmp_path):
    def make(name="llama_relu_untied"):
        dst = tmp_path / "copy"
        shutil.copytree(tiny_flash(name), dst)
        return dst
    return make


def test_unknown_model_name():
    assert_one_line_error(*generate("no-such-model")[::2], "not found")


def test_missing_folder(tmp_path):
    assert_one_line_error(*generate(tmp_path / "missing")[::2], "not found")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(*generate(tmp_path)[::2], "not a model")


def test_gguf_of_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((8, 4))}, {"general.architecture": "gpt2"})
    assert_one_line_error(*generate(path)[::2], "gpt2", "not supported")


def test_truncated_bundles(copy_of):
    folder = copy_of()
    with open(folder / BUNDLES_FILE, "r+b") as f:
        f.truncate(f.seek(0, 2) - 4096)
    assert_one_line_error(*generate(folder, "--mode", "dense")[::2], "truncated")


def test_flipped_bytes_caught_by_checksum(copy_of):
    folder = copy_of()
    with open(folder / BUNDLES_FILE, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    assert_one_line_error(*generate(folder, "--mode", "dense")[::2], "checksum", "layer 0")


def test_other_format_version(copy_of):
    folder = copy_of()
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["format_version"] = 99
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    assert_one_line_error(*generate(folder)[::2], "format version 99")


def test_corrupt_flash_json(copy_of):
    folder = copy_of()
    (folder / CONFIG_FILE).write_text("{ not json")
    assert_one_line_error(*generate(folder)[::2], "corrupt")


def test_flash_mode_needs_conversion(tiny_model):
    """A source that is not built in is converted by the user (a built-in name is prepared: test_prepare)."""
    assert_one_line_error(*generate(tiny_model("llama_silu_tied"), "--mode", "flash")[::2], "convert")


def test_convert_refuses_existing_output_and_leaves_nothing_half_written(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    rc, _, err = run("mlx_flash.convert", "--model", str(tiny_model("opt_pre_ln")), "--out", str(out))
    assert_one_line_error(rc, err, "already exists")
    bad = tmp_path / "bad"
    rc, _, err = run("mlx_flash.convert", "--model", str(tmp_path / "nothing"), "--out", str(bad))
    assert_one_line_error(rc, err, "not found")
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_interrupted_conversion_leaves_no_loadable_folder(tiny_model, tmp_path, monkeypatch):
    import mlx_flash.convert as conv

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "copy_tokenizer", boom)  # dies after the bundles were written
    with pytest.raises(KeyboardInterrupt):
        conv.convert(str(tiny_model("opt_pre_ln")), tmp_path / "out", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_stdin_prompt_and_bad_flags(tiny_flash):
    folder = tiny_flash("llama_silu_tied")
    rc, out, err = run("mlx_flash.generate", "--model", str(folder), "-p", "-", "--max-tokens", "3", stdin="hello")
    assert rc == 0 and "tokens/s" in err and "ms/token" in err and "read/token" in err
    assert_one_line_error(*generate(folder, "--max-tokens", "0")[::2], "max-tokens")


def test_gguf_without_geometry_or_truncated(tmp_path):
    path = tmp_path / "bare.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((8, 4))}, {"general.architecture": "llama"})
    assert_one_line_error(*generate(path)[::2], "lacks llama.")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:50])
    assert_one_line_error(*generate(cut)[::2], "cannot read GGUF")


@pytest.mark.parametrize("model_type", ["deepseek_v3", "mamba", "no_such_type"])
def test_architecture_without_a_supported_ffn_is_refused_naming_the_supported_ones(tiny_model, tmp_path, model_type):
    """A mixture-of-experts, a state-space or an unknown model type: one line that names what runs."""
    from mlx_flash.models.architectures import ARCHITECTURES

    folder = tmp_path / model_type
    shutil.copytree(tiny_model("llama_silu_tied"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    for rc, _, err in (generate(folder), run("mlx_flash.convert", "--model", str(folder), "--out", str(tmp_path / "o"))):
        assert_one_line_error(rc, err, f"model type '{model_type}' is not supported", *ARCHITECTURES)
    assert not (tmp_path / "o").exists()


def test_readme_lists_every_architecture():
    from pathlib import Path

    from mlx_flash.models.architectures import ARCHITECTURES

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("### Architectures and sources"):readme.index("Sources, each converted")]
    for model_type in ARCHITECTURES:
        assert model_type in table, model_type
