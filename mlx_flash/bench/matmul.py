"""`probe matmul`: how fast this device multiplies, MLX against numpy, at a layer's shapes.

    python -m mlx_flash.probe matmul [--shape 4096x16384] [--tokens 1,128] [--bits 4]

Why it exists: on MLX's CPU backend the product sends calibration and prompt matmuls to
numpy (flash.predictor.numpy_is_faster, flash.prefill) and unpacks 4- and 8-bit weights
in numpy (flash.sparsity.dequantize); this command measures the reasons on the machine
at hand. Every point is the median of --repeats timed runs after one warm-up.
"""

import time

import mlx.core as mx
import numpy as np

from ..errors import FlashError
from ..flash.sparsity import dequantize

DEFAULT_SHAPE = "4096x16384"  # OPT-6.7B's fc1: d_model x d_ff
DEFAULT_TOKENS = "1,128"
GROUP = 64


def parse_shape(text: str):
    try:
        d_in, d_out = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise FlashError(f"--shape {text!r}: expected D_INxD_OUT, e.g. 4096x16384")
    if d_in <= 0 or d_out <= 0 or d_in % GROUP:
        raise FlashError(f"--shape {text!r}: both sizes positive, D_IN a multiple of {GROUP}")
    return d_in, d_out


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocation and kernel setup are not the steady rate
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def probe_matmul(d_in: int, d_out: int, tokens, bits: int = 4, repeats: int = 3) -> dict:
    """GFLOP/s of x (N, d_in) @ W.T for W (d_out, d_in): MLX float32, MLX quantized, numpy float32;
    and the ms to turn the quantized W into float32, MLX against numpy."""
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((d_out, d_in), dtype=np.float32) * 0.02)
    wq, scales, biases = mx.quantize(w, group_size=GROUP, bits=bits)
    mx.eval(w, wq, scales, biases)
    w_np = np.array(w)
    points = []
    for n in tokens:
        x_np = rng.standard_normal((n, d_in), dtype=np.float32)
        x = mx.array(x_np)
        flop = 2.0 * n * d_in * d_out
        runs = {
            "mlx float32": lambda: mx.eval(x @ w.T),
            f"mlx {bits}-bit": lambda: mx.eval(mx.quantized_matmul(x, wq, scales, biases, transpose=True,
                                                                    group_size=GROUP, bits=bits)),
            "numpy float32": lambda: x_np @ w_np.T,
        }
        for engine, fn in runs.items():
            s = median_seconds(fn, repeats)
            points.append({"tokens": n, "engine": engine, "ms": s * 1e3, "gflop_per_s": flop / s / 1e9})
    unpack = {
        "mlx": median_seconds(lambda: mx.eval(mx.dequantize(wq, scales, biases, group_size=GROUP, bits=bits)),
                              repeats),
        "numpy": median_seconds(lambda: dequantize(wq, scales, biases, GROUP, bits), repeats),
    }
    return {"d_in": d_in, "d_out": d_out, "bits": bits, "group_size": GROUP, "repeats": repeats,
            "device": str(mx.default_device()), "points": points,
            "dequantize_ms": {k: v * 1e3 for k, v in unpack.items()}}


def add_parser(sub):
    m = sub.add_parser("matmul", help="GFLOP/s of MLX and numpy at a layer's shapes (why prompts go to numpy)")
    m.add_argument("--shape", default=DEFAULT_SHAPE, help="D_INxD_OUT of the weight (default: OPT-6.7B's fc1)")
    m.add_argument("--tokens", default=DEFAULT_TOKENS, help="rows of the input: a,b,c (1 = decode, more = a prompt)")
    m.add_argument("--bits", type=int, default=4, choices=(4, 8), help="the quantized row's bits")
    m.add_argument("--repeats", type=int, default=3, help="timed runs per point; medians")
    return m


def run(args) -> dict:
    """`probe matmul`: the table."""
    d_in, d_out = parse_shape(args.shape)
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        raise FlashError(f"--tokens {args.tokens!r}: expected counts like 1,512")
    if not tokens or min(tokens) <= 0 or args.repeats <= 0:
        raise FlashError("--tokens and --repeats must be positive")
    r = probe_matmul(d_in, d_out, tokens, args.bits, args.repeats)
    print(f"x (N, {d_in}) @ W.T, W ({d_out}, {d_in}), on MLX's {r['device']} and numpy; "
          f"medians of {args.repeats}:")
    print("| tokens | engine | ms | GFLOP/s |")
    print("| --- | --- | --- | --- |")
    for p in r["points"]:
        print(f"| {p['tokens']} | {p['engine']} | {p['ms']:.2f} | {p['gflop_per_s']:.1f} |")
    dq = r["dequantize_ms"]
    print(f"{args.bits}-bit W to float32: MLX dequantize {dq['mlx']:.1f} ms, numpy {dq['numpy']:.1f} ms "
          f"({dq['mlx'] / dq['numpy']:.1f}x)")
    return r
