"""Quantized resident matrices stored (in, out), for the backends where x @ W beats x @ W.T.

nn.QuantizedLinear stores W as (out, in), quantized along `in`, and calls quantized_matmul with
transpose=True: Metal's fastest decode kernel. MLX's CPU backend computes the other layout faster,
and the attention projections plus the LM head are most of a decode step's compute once the FFN is
sparse: `python -m mlx_flash.bench --same-budget opt-6.7b --layers 16 --share 0.6 --rows all` measures
flash's compute per token with either layout (`--resident-layout out-in` / `in-out`; README, Results).
`convert --quantize --resident-layout in-out` quantizes these from the float source along `out`
(an error of the same size, along another axis) and records their paths in the model config's quantization entry;
`in_out_like` rebuilds the modules at load.

A tied embedding is both the LM head and the token lookup: stored (d_model, vocab) it serves the head
with the fast kernel, and a lookup reads one packed element per row (exact, as cheap as a row gather).
"""

from typing import Dict, Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

LAYOUT_KEY = "in_out"  # the model config's quantization entry: paths of the modules stored (in, out)
LAYOUTS = ("out-in", "in-out")


def default_layout() -> str:
    """The layout whose decode kernel is faster on this machine's default device (see the docstring)."""
    return "in-out" if mx.default_device() == mx.cpu else "out-in"


def _pad(n: int, group: int) -> int:
    return -(-n // group) * group


class InOutLinear(nn.Module):
    """y = x @ W + b with W (in, out) quantized along `out`: quantized_matmul(transpose=False)."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool, group_size: int, bits: int):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        self.weight = mx.zeros((input_dims, output_dims * bits // 32), mx.uint32)
        self.scales = mx.zeros((input_dims, output_dims // group_size), mx.float16)
        self.biases = mx.zeros((input_dims, output_dims // group_size), mx.float16)
        if bias:
            self.bias = mx.zeros((output_dims,), mx.float16)
        self.freeze()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, bits: int) -> "InOutLinear":
        d_out, d_in = linear.weight.shape
        m = cls(d_in, d_out, "bias" in linear, group_size, bits)
        m.weight, m.scales, m.biases = mx.quantize(linear.weight.T, group_size, bits)  # (in, out)
        if "bias" in linear:
            m.bias = linear.bias
        return m

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=False,
                                group_size=self.group_size, bits=self.bits)
        return y + self.bias if "bias" in self else y


class InOutEmbedding(nn.Module):
    """A tied embedding stored (d_model, vocab padded to the group size), quantized along the vocabulary."""

    def __init__(self, num_embeddings: int, dims: int, group_size: int, bits: int):
        super().__init__()
        if 32 % bits:
            raise ValueError(f"an in-out embedding needs bits that divide 32, not {bits}")
        self.num_embeddings, self.group_size, self.bits = num_embeddings, group_size, bits
        v = _pad(num_embeddings, group_size)
        self.weight = mx.zeros((dims, v * bits // 32), mx.uint32)
        self.scales = mx.zeros((dims, v // group_size), mx.float16)
        self.biases = mx.zeros((dims, v // group_size), mx.float16)
        self.freeze()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group_size: int, bits: int) -> "InOutEmbedding":
        vocab, dims = emb.weight.shape
        m = cls(vocab, dims, group_size, bits)
        w = mx.pad(emb.weight, [(0, _pad(vocab, group_size) - vocab), (0, 0)])  # zero rows: logits sliced off
        m.weight, m.scales, m.biases = mx.quantize(w.T, group_size, bits)  # (d_model, vocab)
        return m

    def __call__(self, ids: mx.array) -> mx.array:
        per_word = 32 // self.bits
        words = mx.take(self.weight, ids // per_word, axis=1)  # (d_model, *ids.shape)
        q = (words >> ((ids % per_word) * self.bits).astype(mx.uint32)) & ((1 << self.bits) - 1)
        g = ids // self.group_size
        out = q.astype(self.scales.dtype) * mx.take(self.scales, g, axis=1) + mx.take(self.biases, g, axis=1)
        return mx.moveaxis(out, 0, -1)  # (d_model, *ids) -> (*ids, d_model)

    def as_linear(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=False,
                                group_size=self.group_size, bits=self.bits)
        return y[..., : self.num_embeddings]


def tied(model: nn.Module) -> bool:
    """Whether the model's LM head is its embedding (no module named lm_head anywhere in it)."""
    return not any(path.endswith("lm_head") for path, _ in model.named_modules())


def in_out_paths(model: nn.Module, tied: bool, group_size: int) -> list:
    """The float matrices outside the FFN a decode step multiplies by: every Linear whose outputs
    split into groups, and the embedding when it is tied to the LM head."""
    out = []
    for path, m in model.named_modules():
        if ".mlp." in f".{path}.":
            continue
        if (type(m) is nn.Linear and m.weight.shape[0] % group_size == 0) or \
                (tied and type(m) is nn.Embedding and path.endswith("embed_tokens")):
            out.append(path)
    return sorted(out)


def to_in_out(model: nn.Module, paths: Iterable[str], group_size: int, bits: int):
    """Quantize the float modules at `paths` into their in-out forms (convert)."""
    mods = dict(model.named_modules())
    new = []
    for p in paths:
        m = mods[p]
        q = InOutEmbedding.from_embedding if isinstance(m, nn.Embedding) else InOutLinear.from_linear
        new.append((p, q(m, group_size, bits)))
    model.update_modules(tree_unflatten(new))


def in_out_like(model: nn.Module, weights: Dict[str, mx.array], quant: dict):
    """Empty in-out modules at the paths the config names, in place of their float modules (load)."""
    mods = dict(model.named_modules())
    new = []
    for p in quant.get(LAYOUT_KEY, []):
        m = mods.get(p)
        if m is None or f"{p}.weight" not in weights:
            raise ValueError(f"the quantization entry names {p}, which the model or its weights lack")
        q = quant.get(p, quant)
        g, bits = q["group_size"], q["bits"]
        if isinstance(m, nn.Embedding):
            vocab, dims = m.weight.shape
            new.append((p, InOutEmbedding(vocab, dims, g, bits)))
        else:
            d_out, d_in = m.weight.shape
            new.append((p, InOutLinear(d_in, d_out, "bias" in m, g, bits)))
    model.update_modules(tree_unflatten(new))
