"""Writes the HistogramObserver parity fixtures used by tests/histogram_parity.rs.

Run with a PyTorch 2.15 CPU build:

    python qat-core/tests/data/gen_histogram.py

Each fixture holds the observer config, a sequence of inputs, and after each input the
observer's min_val/max_val and the scale/zero_point of calculate_qparams (plus the whole
histogram when it is small). f32 values are written as their shortest f32 repr; the script
checks that each one parses back (string -> nearest f64 -> nearest f32, what serde_json and
`as f32` do) to the same f32.
"""

import json
import os
import warnings

import numpy as np
import torch
from torch.ao.quantization.observer import HistogramObserver

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "histogram")
F32 = np.float32


class F:
    """An f32 to serialize."""

    def __init__(self, v):
        self.v = F32(v)


def fmt_f32(v):
    v = F32(v)
    if not np.isfinite(v):
        raise ValueError(f"non-finite value {v}")
    s = np.format_float_positional(v, unique=True, trim="-")
    if len(s) > 14:
        s = np.format_float_scientific(v, unique=True, trim="-")
    if F32(float(s)) != v or np.signbit(F32(float(s))) != np.signbit(v):
        raise AssertionError(f"{s} does not round-trip to {v!r}")
    return s


def enc(o):
    if isinstance(o, F):
        return fmt_f32(o.v)
    if isinstance(o, dict):
        return "{" + ", ".join(json.dumps(k) + ": " + enc(v) for k, v in o.items()) + "}"
    if isinstance(o, (list, tuple)):
        return "[" + ",".join(enc(v) for v in o) + "]"
    if isinstance(o, (bool, int, str)) or o is None:
        return json.dumps(o)
    raise TypeError(type(o))


def run_case(name, dtype, qscheme, bins, inputs, reduce_range=False, quant_min=None,
             quant_max=None, eps=float(torch.finfo(torch.float32).eps), out_dir=OUT,
             hist_max_bins=128):
    kwargs = dict(bins=bins, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, eps=eps)
    if quant_min is not None:
        kwargs.update(quant_min=quant_min, quant_max=quant_max)
    obs = HistogramObserver(**kwargs)
    steps = []
    for x in inputs:
        x = np.ascontiguousarray(x, dtype=F32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs(torch.from_numpy(x.copy()))
            scale, zp = obs.calculate_qparams()
        step = {
            "shape": list(x.shape),
            "values": [F(v) for v in x.reshape(-1)],
            "min_val": F(obs.min_val.item()),
            "max_val": F(obs.max_val.item()),
            "scale": F(scale.item()),
            "zero_point": int(zp.item()),
        }
        if bins <= hist_max_bins:
            step["histogram"] = [F(v) for v in obs.histogram.numpy()]
        steps.append(step)
    fixture = {
        "name": name,
        "torch_version": torch.__version__,
        "config": {
            "dtype": {torch.quint8: "quint8", torch.qint8: "qint8"}[dtype],
            "qscheme": {torch.per_tensor_affine: "per_tensor_affine",
                        torch.per_tensor_symmetric: "per_tensor_symmetric"}[qscheme],
            "reduce_range": reduce_range,
            "quant_min": quant_min,
            "quant_max": quant_max,
            "bins": bins,
            "eps": F(eps),
        },
        "steps": steps,
    }
    text = enc(fixture) + "\n"
    path = os.path.join(out_dir, name + ".json")
    with open(path, "w") as f:
        f.write(text)
    print(f"{name}: {len(steps)} steps, {len(text)} bytes, "
          f"final scale {steps[-1]['scale'].v!r} zp {steps[-1]['zero_point']}")


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(2015)

    def normal(n, s, mu=0.0):
        return (rng.standard_normal(n) * s + mu).astype(F32)

    # 1. quint8 affine, 2048 bins: the range grows, shrinks (inside), grows on both sides.
    run_case("quint8_affine_2048", torch.quint8, torch.per_tensor_affine, 2048, [
        normal(600, 1.0, 0.3),
        normal(500, 0.4),
        normal(700, 2.5, -0.5).reshape(7, 100),
        normal(400, 0.1, 0.05),
    ])

    # 2. qint8 symmetric, 2048 bins, heavy tails (the search clips them).
    run_case("qint8_symmetric_2048", torch.qint8, torch.per_tensor_symmetric, 2048, [
        rng.laplace(0.0, 0.5, 800).astype(F32).reshape(8, 100),
        rng.laplace(0.0, 1.5, 600).astype(F32),
        rng.laplace(0.2, 0.3, 500).astype(F32),
    ])

    # 3. quint8 affine with reduce_range: ReLU-like non-negative activations with an outlier;
    # only the max grows.
    a = np.maximum(normal(800, 1.0), 0).astype(F32)
    a[17] = 9.5
    run_case("quint8_reduce_range_2048", torch.quint8, torch.per_tensor_affine, 2048, [
        a,
        np.maximum(normal(600, 1.3), 0).astype(F32),
        np.maximum(normal(600, 3.0), 0).astype(F32).reshape(2, 3, 100),
    ], reduce_range=True)

    # 4. A 4-bit custom range 0..15 on quint8 with 64 bins.
    run_case("quint8_custom_0_15_bins64", torch.quint8, torch.per_tensor_affine, 64, [
        rng.uniform(-1.0, 3.0, 500).astype(F32),
        normal(500, 0.5, 1.0),
        rng.uniform(-2.5, 2.0, 400).astype(F32),
        normal(300, 0.2),
    ], quant_min=0, quant_max=15)

    # 5. qint8 symmetric, reduce_range, 64 bins; the second input puts values exactly on the
    # bin edges of the running histogram (and on its max).
    first = rng.uniform(-2.0, 3.0, 400).astype(F32)
    lo, hi = first.min(), first.max()
    edges = torch.linspace(torch.tensor(lo), torch.tensor(hi), 65).numpy()
    second = np.concatenate([edges, edges[::3], np.array([lo, hi, hi], dtype=F32),
                             rng.uniform(lo, hi, 200).astype(F32)])
    run_case("qint8_symmetric_reduce_range_bins64", torch.qint8, torch.per_tensor_symmetric, 64, [
        first,
        second,
        normal(300, 2.0),
    ], reduce_range=True)

    # 6. All-equal inputs: start degenerate (min == max), stay there, then grow, then a
    # constant input that extends the min.
    run_case("all_equal_then_grow_2048", torch.quint8, torch.per_tensor_affine, 2048, [
        np.full(300, 0.75, dtype=F32),
        np.full((2, 150), 0.75, dtype=F32),
        normal(500, 0.5, 0.5),
        np.full(200, -2.0, dtype=F32),
    ])

    # 7. All zeros, then small data.
    run_case("all_zero_qint8_symmetric_2048", torch.qint8, torch.per_tensor_symmetric, 2048, [
        np.zeros(256, dtype=F32),
        np.zeros((4, 64), dtype=F32),
        normal(500, 0.01),
    ])

    # 8. quint8 symmetric (zero point 128), 128 bins, uniform then shifted data.
    run_case("quint8_symmetric_bins128", torch.quint8, torch.per_tensor_symmetric, 128, [
        rng.uniform(-0.5, 1.5, 600).astype(F32),
        rng.uniform(0.5, 2.5, 600).astype(F32),
        normal(400, 0.3),
    ])

    # 9. Tiny histogram (3 bins, fewer than the 8 lanes of torch's vectorised sum) and a
    # custom eps.
    run_case("quint8_affine_bins3_eps", torch.quint8, torch.per_tensor_affine, 3, [
        normal(200, 1.0),
        normal(200, 2.0, 1.0),
    ], eps=1e-3)


if __name__ == "__main__":
    main()
