"""The feed-forward block, the one part of a model that differs between modes.

Every architecture names its FFN module `mlp` (models/architectures.py), with `up_proj`/`down_proj`
and `gate_proj` in GLU models (Phi-3 fuses gate and up in `gate_up_proj`; OPT's `fc1`/`fc2` are
renamed in its `sanitize`). Dense mode puts a `DenseFFN` there in place of the model class's own MLP,
flash mode a `FlashFFN` (mlx_flash.flash.ffn), the naive baseline an `MmapFFN`, all with the same
call signature: (..., d_model) -> (..., d_model).
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "relu": nn.relu,
    "fatrelu": nn.relu,  # with FFNSpec.act_threshold: values at or below it are zeroed too (ProSparse)
    "drelu": nn.relu,  # on the gate and on up (TurboSparse, Bamboo)
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
}


@dataclass
class FFNSpec:
    """Geometry of one FFN: what the bundle layout and every provider need."""

    d_model: int
    d_ff: int
    glu: bool  # gate_proj present: h = act(gate x) * (up x), else h = act(up x)
    bias: bool
    activation: str  # a key of ACTIVATIONS
    act_threshold: float = 0.0  # FATReLU's threshold

    def act(self, x: mx.array) -> mx.array:
        if self.activation == "fatrelu":  # the authors' FATReLU keeps x >= t (THUNLP's CPM code)
            return mx.where(x >= self.act_threshold, x, mx.zeros_like(x))
        return ACTIVATIONS[self.activation](x)

    def hidden(self, gate, up: mx.array) -> mx.array:
        """The hidden activations from the gate and up projections (gate None without a GLU)."""
        if not self.glu:
            return self.act(up)
        if self.activation == "drelu":
            up = nn.relu(up)
        return self.act(gate) * up


class DenseFFN(nn.Module):
    """The dense provider, with the checkpoint's weight names (fused: Phi-3's `gate_up_proj`)."""

    def __init__(self, spec: FFNSpec, fused: bool = False):
        super().__init__()
        self.spec, self.fused = spec, fused
        if fused:
            self.gate_up_proj = nn.Linear(spec.d_model, 2 * spec.d_ff, bias=spec.bias)
        elif spec.glu:
            self.gate_proj = nn.Linear(spec.d_model, spec.d_ff, bias=spec.bias)
        if not fused:
            self.up_proj = nn.Linear(spec.d_model, spec.d_ff, bias=spec.bias)
        self.down_proj = nn.Linear(spec.d_ff, spec.d_model, bias=spec.bias)

    def activations(self, x: mx.array) -> mx.array:
        """The FFN's hidden activations (..., d_ff): what sparsity is defined on."""
        if self.fused:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
            return self.spec.hidden(gate, up)
        return self.spec.hidden(self.gate_proj(x) if self.spec.glu else None, self.up_proj(x))

    def matrix(self, name: str):
        """Matrix "gate", "up" or "down" as (weight or (weight, scales, biases), bias or None, source
        quantization {"group_size", "bits"} or None): the rows of a fused matrix are sliced, which keeps
        quantized rows exact (they are quantized along d_model)."""
        if self.fused and name != "down":
            m, rows = self.gate_up_proj, slice(0, self.spec.d_ff) if name == "gate" else slice(self.spec.d_ff, None)
        else:
            m, rows = getattr(self, f"{name}_proj"), slice(None)
        bias = m.bias[rows] if "bias" in m else None
        if isinstance(m, nn.QuantizedLinear):
            return (m.weight[rows], m.scales[rows], m.biases[rows]), bias, {"group_size": m.group_size,
                                                                           "bits": m.bits}
        return m.weight[rows], bias, None

    def down(self, h: mx.array) -> mx.array:
        """(..., d_ff) activations -> (..., d_model): the second half of the FFN."""
        return self.down_proj(h)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down(self.activations(x))


def _rows_matmul(a: mx.array, w, transpose: bool, quant, bits_key="bits") -> mx.array:
    """a @ W.T (gate, up: neuron rows) or a @ W (down^T: neuron rows), W float or quantized."""
    if quant is None:
        return a @ (w.T if transpose else w)
    bits = quant.get(bits_key, quant["bits"])
    return mx.quantized_matmul(a, *w, transpose=transpose, group_size=quant["group_size"], bits=bits)


def bundle_hidden(x: mx.array, spec: FFNSpec, fields: dict, quant=None) -> mx.array:
    """Hidden activations (..., n) of the neurons whose bundles are in `fields`.

    fields["gate"|"up"|"down"] are (n, d_model) arrays, or (weight, scales, biases)
    triples of row-quantized matrices; fields["bias"] is (n, 2) [gate, up] or (n, 1).
    """
    up = _rows_matmul(x, fields["up"], True, quant)
    if spec.bias:
        up = up + fields["bias"][:, -1]
    if not spec.glu:
        return spec.hidden(None, up)
    gate = _rows_matmul(x, fields["gate"], True, quant)
    if spec.bias:
        gate = gate + fields["bias"][:, 0]
    return spec.hidden(gate, up)


def bundle_down(h: mx.array, fields: dict, down_bias, quant=None) -> mx.array:
    """Sum of the neurons' down columns weighted by h: (..., n) -> (..., d_model)."""
    y = _rows_matmul(h, fields["down"], False, quant, "down_bits")
    return y + down_bias if down_bias is not None else y


def bundle_ffn(x: mx.array, spec: FFNSpec, fields: dict, down_bias, quant=None) -> mx.array:
    """The FFN from neuron bundles. With every neuron present this is the dense FFN;
    with a subset it is the FFN over exactly those neurons (rows [0, n) of a neuron cache).
    """
    return bundle_down(bundle_hidden(x, spec, fields, quant), fields, down_bias, quant)


class BundleFFN(nn.Module):
    """Dense mode of a converted model: every neuron's bundle resident, computed like flash."""

    def __init__(self, spec: FFNSpec, fields: dict, down_bias, quant=None):
        super().__init__()
        self.spec, self.quant = spec, quant
        self.fields, self.down_bias = fields, down_bias
        self.freeze()

    def activations(self, x: mx.array) -> mx.array:
        return bundle_hidden(x, self.spec, self.fields, self.quant)

    def down(self, h: mx.array) -> mx.array:
        return bundle_down(h, self.fields, self.down_bias, self.quant)

    def float_rows(self, name: str, rows: slice = slice(None)) -> mx.array:
        """Rows of field "gate", "up", "down" (down^T: neuron rows), (n, d_model), or "bias", (n, k), as
        float32; quantized ones dequantized at float32 (what quantized_matmul computes with)."""
        w = self.fields[name]
        if not isinstance(w, tuple):
            return w[rows].astype(mx.float32)
        q, scales, biases = (v[rows] for v in w)
        bits = self.quant.get(f"{name}_bits", self.quant["bits"])
        return mx.dequantize(q, scales.astype(mx.float32), biases.astype(mx.float32),
                             group_size=self.quant["group_size"], bits=bits)

    def __call__(self, x: mx.array) -> mx.array:
        return bundle_ffn(x, self.spec, self.fields, self.down_bias, self.quant)
