"""Which FFN neurons are active, measured on text (paper Section 3.1, DESIGN "Sparsity").

- ReLU-family models (OPT and ReluLLaMA: ReLU; ProSparse: FATReLU; TurboSparse, Bamboo: dReLU):
  neuron j is active iff its hidden activation is not zero, as the paper counts it.
- Other GLU models (SmolLM2, Llama 3): active iff |act(gate_j x) * up_j x| > t_l, with
  one threshold per layer calibrated on text for a target sparsity.

`record_layers` runs a dense model over text one layer at a time and hands each
layer's FFN inputs and hidden activations (the training data of its predictor)
to the per-layer work, so that a model bigger than memory can be calibrated.
On MLX's CPU backend its matmuls (the FFN's, and the attention's projections) run in
numpy on float32 weights dequantized a block at a time (flash.predictor.numpy_is_faster):
`python -m mlx_flash.probe matmul` measures both engines on the machine at hand.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import FlashError
from ..models.architectures import RELU_FAMILY
from ..models.in_out import InOutLinear
from .predictor import numpy_is_faster

DATA = Path(__file__).resolve().parent.parent / "data"  # mlx_flash/data
CALIBRATION_TEXT = DATA / "calibration.txt"
HELDOUT_TEXT = DATA / "heldout.txt"
FLOAT_BLOCK_BYTES = 32 << 20  # float32 weights of the FFN's neuron rows dequantized at once (numpy pass)


def is_relu(activation: str) -> bool:
    """Whether inactive neurons are exactly zero (the ReLU family), so sparsity needs no threshold."""
    return activation in RELU_FAMILY


def read_texts(paths: Optional[List[str]]) -> str:
    """The calibration text: the files given, or the text shipped in the package."""
    paths = paths or [str(CALIBRATION_TEXT)]
    out = []
    for p in paths:
        try:
            out.append(Path(p).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise FlashError(f"cannot read text file {p}: {e.strerror}")
    text = "\n\n".join(out)
    if not text.strip():
        raise FlashError("the calibration text is empty")
    return text


def encode_long(tokenizer, text: str, piece: int = 4000) -> list:
    """Token ids of a long text, encoded paragraph-aligned piece by piece (tokenizers warn past their
    context length, and a BPE never merges across a paragraph break anyway)."""
    ids, start = [], 0
    while start < len(text):
        end = text.find("\n", start + piece)
        end = len(text) if end < 0 else end + 1
        ids += tokenizer.encode(text[start:end], add_special_tokens=start == 0)
        start = end
    return ids


def paragraph_offsets(text: str, min_chars: int = 40) -> List[int]:
    """Character offsets of the text's paragraphs (blank-line separated) of at least `min_chars`."""
    out, pos = [], 0
    for para in text.split("\n\n"):
        body = para.strip()
        if len(body) >= min_chars:
            out.append(pos + para.index(body))
        pos += len(para) + 2
    return out


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer, user: str, answer: str = "") -> List[int]:
    """A chat as the server sends it to the model (user turn, generation prompt), then `answer`."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                           tokenize=False)
    return tokenizer.encode(prompt + answer, add_special_tokens=False)


def start_sequences(tokenizer, text: str, n_seq: int, seq_len: int) -> np.ndarray:
    """(n_seq, seq_len) token ids, each beginning the way a prompt does, so that the first token has
    no history, as in generation (massive activations fire there: README, "Quality"): at paragraph
    starts spread evenly over the text, every other one as a chat (user turn: the paragraph; answer:
    the text after it) when the tokenizer has a chat template."""
    starts = paragraph_offsets(text) + [len(text)]
    chat = has_chat_template(tokenizer)

    def sequence(i: int, k: int) -> List[int]:
        a, b = starts[k], starts[k + 1]
        if chat and i % 2:
            return chat_ids(tokenizer, text[a:b].strip()[:300], text[b : b + 8 * seq_len].lstrip())
        return tokenizer.encode(text[a : a + 8 * seq_len])

    out = []
    for i, k in enumerate(np.linspace(0, max(0, len(starts) - 2), n_seq).astype(int)):
        # near the text's end, the paragraphs before: this one is followed by fewer than seq_len tokens
        tries = (sequence(i, j) for j in [*range(k, len(starts) - 1), *range(k - 1, -1, -1)])
        ids = next((ids for ids in tries if len(ids) >= seq_len), None)
        if ids is None:
            break
        out.append(ids[:seq_len])
    if len(out) < n_seq:
        raise FlashError(f"the text has {len(out)} paragraph starts followed by {seq_len} tokens, fewer than "
                         f"{n_seq}: give a longer text or fewer --tokens")
    return np.array(out, dtype=np.int32)


def token_windows(tokenizer, text: str, n_tokens: int, seq_len: int) -> np.ndarray:
    """(n_seq, seq_len) token ids: consecutive windows of the text."""
    ids = np.array(encode_long(tokenizer, text), dtype=np.int32)
    n_seq = min(n_tokens // seq_len, len(ids) // seq_len)
    if n_seq < 1:
        raise FlashError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: n_seq * seq_len].reshape(n_seq, seq_len)


class _LastLayerDone(Exception):
    """Raised after the last FFN: the final norm and the LM head are not needed."""


@dataclass
class LayerActivations:
    """One layer's FFN over every calibration token, handed to the per-layer work while that
    layer's bundles are in memory. Nothing of it outlives the call unless the work keeps it."""

    layer: int
    x: np.ndarray  # (N, d_model) float16: FFN inputs
    h: np.ndarray  # (N, d_ff) float16: |hidden activation|
    seq_len: int  # tokens are N // seq_len consecutive windows: token i sits at position i % seq_len
    prev_x: Optional[np.ndarray]  # (N, d_model) float16: the previous layer's FFN inputs (None at layer 0)
    ffn: nn.Module  # this layer's FFN provider (activations, down)
    y_norm: np.ndarray  # (N,) float32: the norm of the FFN's output per token (what a miss is measured against)


class _Recorder(nn.Module):
    """Stands in for layer l's FFN during the pass: gets the provider when the layer is reached,
    computes it over the whole batch in chunks, hands the activations to the per-layer work."""

    def __init__(self, layer: int, run: "_Pass"):
        super().__init__()
        self.layer, self.run = layer, run

    def __call__(self, x):
        run, l = self.run, self.layer
        mx.eval(x)  # this layer's attention, over every sequence
        ffn = run.ffn_for(l)
        B, L, D = x.shape
        flat = x.reshape(-1, D)  # (N, d_model)
        xs = np.array(flat.astype(mx.float16))
        hs = np.empty((len(xs), ffn.spec.d_ff), dtype=np.float16)
        if run.numpy and hasattr(ffn, "float_rows"):
            dtype = ffn.down(ffn.activations(flat[:1])).dtype  # what MLX's FFN would return
            y = ffn_numpy(ffn, np.asarray(flat.astype(mx.float32)), hs, run.chunk)  # (N, d_model) float32
            norms = np.linalg.norm(y, axis=-1)
            ys = [None if run.last(l) else mx.array(y).astype(dtype)]
            del y
        else:
            norms = np.empty(len(xs), dtype=np.float32)
            ys = []
            for i in range(0, len(xs), run.chunk):  # (chunk, d_ff) activations at a time, not (N, d_ff)
                h = ffn.activations(flat[i : i + run.chunk])
                y = ffn.down(h)
                norm = mx.linalg.norm(y.astype(mx.float32), axis=-1)
                mx.eval(h, y, norm)
                hs[i : i + len(h)] = np.array(mx.abs(h).astype(mx.float16))
                norms[i : i + len(h)] = np.array(norm)
                ys.append(y if not run.last(l) else None)
        run.on_layer(LayerActivations(l, xs, hs, L, run.prev_x, ffn, norms))
        run.prev_x = xs
        run.done += 1
        if run.last(l):
            raise _LastLayerDone
        y = mx.concatenate(ys).reshape(B, L, D)
        mx.eval(y)  # before the next layer's bundles replace this one's
        return y


def float_block(d_model: int, d_ff: int) -> int:
    """Neuron rows whose gate, up and down the numpy pass holds in float32 at once."""
    return max(1, min(d_ff, FLOAT_BLOCK_BYTES // (3 * 4 * d_model)))


def _hidden_numpy(spec, g: Optional[np.ndarray], u: np.ndarray) -> np.ndarray:
    """FFNSpec.hidden on (c, n) float32 numpy arrays (g None without a GLU), into a new array: in numpy
    for SiLU and ReLU (MLX's CPU backend takes 20x longer over exp), by MLX for the others."""
    a = u if g is None else g  # what the activation applies to
    if spec.activation in ("silu", "swish"):
        h = np.negative(a)
        with np.errstate(over="ignore"):  # exp(-a) = inf: silu(a) = -0
            np.exp(h, out=h)
        h += 1
        np.divide(a, h, out=h)  # a * sigmoid(a)
    elif spec.activation == "relu":
        h = np.maximum(a, 0)
    else:
        return np.asarray(spec.hidden(None if g is None else mx.array(g), mx.array(u)))
    if g is not None:
        h *= u
    return h


def dequantize(q: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> np.ndarray:
    """MLX's affine dequantize of MLX or numpy arrays, as a float32 numpy array: 4 and 8 bits unpacked by
    numpy from the packed bytes (little-endian, the first element in the low bits; faster than MLX's CPU
    dequantize, and equal to it: tests/test_prompt.py), other widths by MLX."""
    if bits not in (4, 8):
        return np.asarray(mx.dequantize(mx.array(q), mx.array(_float32(scales)), mx.array(_float32(biases)),
                                        group_size=group_size, bits=bits))
    b = np.asarray(q).view(np.uint8)  # (n, d * bits / 8)
    n = b.shape[0]
    if bits == 8:
        w = b.astype(np.float32)
    else:
        w = np.empty((n, 2 * b.shape[1]), dtype=np.float32)
        w[:, 0::2] = b & 0x0F
        w[:, 1::2] = b >> 4
    w = w.reshape(n, -1, group_size)  # (n, groups, group_size)
    w *= _float32(scales)[:, :, None]
    w += _float32(biases)[:, :, None]
    return w.reshape(n, -1)


def _float32(a) -> np.ndarray:
    """An MLX or numpy array as float32 numpy."""
    return a.astype(np.float32, copy=False) if isinstance(a, np.ndarray) else np.asarray(a.astype(mx.float32))


def float_rows(ffn, name: str, rows: slice) -> np.ndarray:
    """models.ffn.BundleFFN.float_rows as numpy, quantized fields unpacked by `dequantize`."""
    w = ffn.fields[name]
    if not isinstance(w, tuple):
        return np.asarray(w[rows].astype(mx.float32))
    q, scales, biases = (v[rows] for v in w)
    return dequantize(q, scales, biases, ffn.quant["group_size"], ffn.quant.get(f"{name}_bits", ffn.quant["bits"]))


def ffn_numpy(ffn, x: np.ndarray, hs: Optional[np.ndarray], chunk: int, down_bias: bool = True) -> np.ndarray:
    """The FFN of (N, d_model) float32 inputs in numpy, neuron rows dequantized a block at a time and
    tokens `chunk` at a time; fills hs, (N, d_ff) float16, with |h| (when given); returns (N, d_model)
    float32, with the down bias unless down_bias is False (flash.prompt adds it once over slices)."""
    spec = ffn.spec
    y = np.zeros((len(x), spec.d_model), dtype=np.float32)
    block = float_block(spec.d_model, spec.d_ff)
    up = ffn.fields["up"]
    n = (up[0] if isinstance(up, tuple) else up).shape[0]  # d_ff, or a slice's rows (flash.prompt)
    for j in range(0, n, block):
        rows = slice(j, min(j + block, n))
        up, down = float_rows(ffn, "up", rows), float_rows(ffn, "down", rows)  # (n, D)
        gate = float_rows(ffn, "gate", rows) if spec.glu else None
        bias = float_rows(ffn, "bias", rows) if spec.bias else None  # (n, 2) or (n, 1)
        for i in range(0, len(x), chunk):
            xi = x[i : i + chunk]
            u = xi @ up.T  # (c, n)
            g = None if gate is None else xi @ gate.T
            if bias is not None:
                u += bias[:, -1]
                if g is not None:
                    g += bias[:, 0]
            h = _hidden_numpy(spec, g, u)  # (c, n) float32
            if hs is not None:
                hs[i : i + len(h), rows] = np.abs(h, out=u)
            y[i : i + len(h)] += h @ down
    if down_bias and ffn.down_bias is not None:
        y += np.asarray(ffn.down_bias.astype(mx.float32))
    return y


class NumpyLinear(nn.Module):
    """Stands in for a Linear, an (affine) QuantizedLinear or an InOutLinear of the resident part during
    a numpy pass: its weight dequantized at float32 for the call (one matrix at a time), numpy multiplies."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def __call__(self, x: mx.array) -> mx.array:
        m = self.linear
        if isinstance(m, nn.Linear):
            w, dtype = np.asarray(m.weight.astype(mx.float32)).T, mx.result_type(x.dtype, m.weight.dtype)
        else:  # quantized (out, in) along in, or InOutLinear's (in, out) along out
            w = dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            w = w if isinstance(m, InOutLinear) else w.T
            dtype = mx.result_type(x.dtype, m.scales.dtype)  # as quantized_matmul returns
        y = np.asarray(x.astype(mx.float32)).reshape(-1, x.shape[-1]) @ w  # (N, in) @ (in, out)
        if "bias" in m:
            y += np.asarray(m.bias.astype(mx.float32))
            dtype = mx.result_type(dtype, m.bias.dtype)
        return mx.array(y).reshape(*x.shape[:-1], y.shape[-1]).astype(dtype)


def swap_modules(module: nn.Module, swapped: list, numpy_version, done: type):
    """Put numpy_version(child) in place of every module under `module` for which it is not None (looking
    inside the others), appending (parent, key, original) to `swapped` to put them back; a `done` is one
    swapped already (reached again through another module: FlashFFN.next, FlashExperts.next)."""

    def visit(parent, key, child):
        if isinstance(child, done):
            return
        new = numpy_version(child)
        if new is not None:
            swapped.append((parent, key, child))
            parent[key] = new
        elif isinstance(child, dict):  # modules too
            for k, v in list(child.items()):
                visit(child, k, v)
        elif isinstance(child, list):
            for k, v in enumerate(child):
                visit(child, k, v)

    for k, v in module.children().items():
        visit(module, k, v)


def swap_linears(module: nn.Module, swapped: list):
    """Put a NumpyLinear in place of every Linear, affine QuantizedLinear and InOutLinear under `module`."""

    def numpy_version(child):
        if isinstance(child, (nn.Linear, InOutLinear)) or (isinstance(child, nn.QuantizedLinear)
                                                           and getattr(child, "mode", "affine") == "affine"):
            return NumpyLinear(child)
        return None

    swap_modules(module, swapped, numpy_version, NumpyLinear)


@dataclass
class _Pass:
    ffn_for: Callable[[int], nn.Module]
    on_layer: Callable[[LayerActivations], None]
    n_layers: int
    chunk: int
    numpy: bool  # the FFN's and the attention's matmuls in numpy (MLX's CPU backend)
    prev_x: Optional[np.ndarray] = None
    done: int = 0

    def last(self, l: int) -> bool:
        return l == self.n_layers - 1


def record_layers(model, windows: np.ndarray, ffn_for: Callable[[int], nn.Module],
                  on_layer: Callable[[LayerActivations], None], chunk: int = 256):
    """One dense forward pass over all token windows at once, so that it reaches layer l for every
    sequence before layer l + 1: `ffn_for(l)` gives layer l's FFN then (read from disk, say), and
    `on_layer` does that layer's work before the next layer is read. Peak memory: the resident part,
    one layer's FFN and one layer's activations, whatever the number of layers.

    ffn_for(l) returns a provider with `spec`, `activations(x)` and `down(h)` (models.ffn), and
    `float_rows` for the numpy pass (models.ffn.BundleFFN)."""
    layers = model.layers
    originals = [l.mlp for l in layers]
    run = _Pass(ffn_for, on_layer, len(layers), chunk, numpy_is_faster())
    for i, layer in enumerate(layers):
        layer.mlp = _Recorder(i, run)
    swapped = []  # the attention's linears, computed by numpy
    try:
        for layer in layers if run.numpy else []:
            swap_linears(layer, swapped)
        model(mx.array(windows))
    except _LastLayerDone:
        pass
    finally:
        for parent, key, linear in swapped:
            parent[key] = linear
        for layer, f in zip(layers, originals):
            layer.mlp = f
    assert run.done == len(layers)


def threshold(h: np.ndarray, activation: str, sparsity: float) -> float:
    """A layer's t_l: 0 for ReLU models, else the `sparsity` quantile of |h| over the calibration tokens."""
    if is_relu(activation):
        return 0.0
    return float(np.quantile(h.astype(np.float32), sparsity))


def active_mask(h: np.ndarray, t: float) -> np.ndarray:
    """(N, d_ff) bool: a layer's true active sets."""
    return h.astype(np.float32) > t


def down_norms(ffn, d_ff: int, chunk: int = 1024) -> np.ndarray:
    """(d_ff,) float32: ||down_j||, the norm of what neuron j adds to the FFN output per unit of |h_j|
    (any FFN provider: its down projection applied to unit vectors, its bias taken off; the norms of
    its down rows when it has them, models.ffn.BundleFFN.float_rows)."""
    out = np.empty(d_ff, dtype=np.float32)
    if hasattr(ffn, "float_rows"):
        for i in range(0, d_ff, chunk):
            out[i : i + chunk] = np.array(mx.linalg.norm(ffn.float_rows("down", slice(i, i + chunk)), axis=-1))
        return out
    zero = ffn.down(mx.zeros((1, d_ff)))
    for i in range(0, d_ff, chunk):
        eye = mx.eye(min(chunk, d_ff - i), d_ff, k=i)  # (rows, d_ff): unit vectors e_i .. e_{i+rows}
        out[i : i + len(eye)] = np.array(mx.linalg.norm((ffn.down(eye) - zero).astype(mx.float32), axis=-1))
    return out
