"""torchao 0.18's side of benches/intx_fake_quant.rs: its own fake quantizer
(torchao.quantization.qat.fake_quantizer.IntxFakeQuantizer, the module QATConfig inserts into
every Linear) on a 1024 x 1024 f32 tensor, beside a plain copy of the same tensor in the same
run, on one thread.

    /work/venv-torch/bin/python benches/reference/torchao_fake_quant.py [--rounds 15] [--threads 1]

Rows (each allocates its output, as Tensor::copy and our kernels do):
  copy            x.clone()
  int4_g32 fwd    IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32))(x)
                  (symmetric, the 8da4w weight quantizer), x without requires_grad
  int4_g32 fwd(rg) the same on x.requires_grad (as on a weight in training: autograd records
                  the graph), no backward
  int4_g32 f+b    the same with x.requires_grad: y = fq(x); y.backward(g) (autograd, the
                  straight-through gradient torchao computes); x.grad reset between calls
  int8_token fwd  IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token",
                  is_symmetric=False))(x) (the 8da4w activation quantizer; rows are tokens)
  int8_token fwd(rg) the same on x.requires_grad (as on a Linear input in training)
Timing: the rows are interleaved round-robin, `--rounds` rounds; in each round a row runs
`--iters` calls after one untimed call and its sample is the mean time of a call; the
figure is the median sample. Gelem/s = 2^20 / median; "x copy" = time(copy) / time(row)
(1.0 = as fast as a copy), the same ratio the criterion bench reports.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()

    import torch
    import torchao
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, cols = 1024, 1024
    n = rows * cols
    # The same range as benches/intx_fake_quant.rs's data: uniform in [-1.5, 3.0).
    x = torch.rand(rows, cols) * 4.5 - 1.5
    xg = x.clone().requires_grad_(True)
    g = torch.randn(rows, cols)

    fq_w = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32))
    fq_a = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))

    def copy():
        return x.clone()

    def int4_fwd():
        return fq_w(x)

    def int4_fwd_rg():
        return fq_w(xg)

    def int4_fwd_bwd():
        xg.grad = None
        y = fq_w(xg)
        y.backward(g)
        return xg.grad

    def int8_tok_fwd():
        return fq_a(x)

    def int8_tok_fwd_rg():
        return fq_a(xg)

    # Sanity: the quantizers do what their names say (codes on a grid, gradient shape).
    with torch.no_grad():
        y4 = int4_fwd().reshape(rows, cols // 32, 32)
        y8 = int8_tok_fwd()
        assert y8.shape == x.shape
    assert int4_fwd_bwd().shape == x.shape
    distinct = torch.unique(y4[0, 0]).numel()
    assert distinct <= 16, f"int4 group has {distinct} distinct values"
    distinct8 = torch.unique(y8[0]).numel()
    assert distinct8 <= 256, f"int8 token has {distinct8} distinct values"

    cases = [("copy", copy), ("int4_g32 fwd", int4_fwd), ("int4_g32 fwd(rg)", int4_fwd_rg),
             ("int4_g32 fwd+bwd", int4_fwd_bwd), ("int8_token fwd", int8_tok_fwd),
             ("int8_token fwd(rg)", int8_tok_fwd_rg)]
    samples = {name: [] for name, _ in cases}
    for _ in range(args.rounds):
        for name, f in cases:
            f()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                f()
            samples[name].append((time.perf_counter() - t0) / args.iters)

    print(f"python {platform.python_version()}  torch {torch.__version__}  torchao {torchao.__version__}  "
          f"threads {torch.get_num_threads()}")
    print(f"IntxFakeQuantizer on a {rows}x{cols} f32 tensor ({n:,} elements); median of {args.rounds} "
          f"interleaved rounds x {args.iters} calls")
    base = statistics.median(samples["copy"])
    print(f"{'row':<20} {'median ms':>10} {'min ms':>8} {'Gelem/s':>8} {'x copy':>8}")
    for name, _ in cases:
        med = statistics.median(samples[name])
        print(f"{name:<20} {med * 1e3:10.3f} {min(samples[name]) * 1e3:8.3f} {n / med / 1e9:8.3f} "
              f"{base / med:8.4f}")


if __name__ == "__main__":
    main()
