"""PyTorch 2.15 + torchao 0.18's side of the Llama-block training-step bench: one training step
(zero_grad, forward, loss, backward, AdamW step) of one block of the tiny-shakespeare Llama
(examples/shakespeare_qat.rs; ../shared/reference/tinyllama_qat.py), in float and prepared for
QAT with torchao's 8da4w, at 1 and 2 threads.

    /work/venv-torch/bin/python benches/reference/llama_block_step.py [--threads 1 2]
        [--warmup 5] [--rounds 6] [--per-round 5]

Block (module names as in the reference and Meta Llama): x + attention(attention_norm(x)), then
h + feed_forward(ffn_norm(h)); RMSNorm eps 1e-5 with weight; attention wq, wk, wv, wo 128->128
without bias, 4 heads x 32, RoPE base 1e4 in the interleaved-pair convention
(candle_nn::rotary_emb::rope_i), causal softmax(q k^T / sqrt(32)) v; SwiGLU
w2(silu(w1 x) * w3 x), w1, w3 128->352, w2 352->128, no bias. Init N(0, 0.02), wo and w2
N(0, 0.02/sqrt(8)), norm weights 1.
Input: x of shape (32, 64, 128), N(0, 1), requires_grad (inside the model the block's input
needs its gradient, so the step computes it). Loss: mean of the squared block output.
AdamW(lr 3e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.1) over the block's parameters.

Configs:
  float   the block as above.
  8da4w   a copy of it after torchao.quantization.quantize_(block, QATConfig(
          activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
          weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare"))
          (Int8DynamicActivationInt4Weight's QAT: every Linear's input fake-quantized per token,
          int8 asymmetric; its weight per group of 32, int4 symmetric).
Timing per thread count (torch.set_num_threads): fresh copies and optimizers, --warmup untimed
steps each, then --rounds rounds in which each config takes --per-round steps in turn
(interleaved, so drift in the machine's load hits both alike); median ms per step over the
rounds x per-round timed steps, with the median forward / backward / AdamW split.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, N_HEADS, HIDDEN, N_LAYERS = 128, 4, 352, 4
HEAD_DIM = DIM // N_HEADS
NORM_EPS, ROPE_BASE = 1e-5, 10000.0
BATCH, CTX = 32, 64


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_cos_sin(seq_len: int, head_dim: int = HEAD_DIM, base: float = ROPE_BASE):
    i = torch.arange(0, head_dim, 2, dtype=torch.float32)
    theta = 1.0 / torch.pow(torch.tensor(base, dtype=torch.float32), i / head_dim)
    ang = torch.arange(seq_len, dtype=torch.float32)[:, None] * theta[None, :]
    return ang.cos(), ang.sin()


def apply_rope_interleaved(x, cos, sin):
    x = x.unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(DIM, DIM, bias=False)
        self.wk = nn.Linear(DIM, DIM, bias=False)
        self.wv = nn.Linear(DIM, DIM, bias=False)
        self.wo = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q = self.wq(x).view(B, T, N_HEADS, HEAD_DIM).transpose(1, 2)
        k = self.wk(x).view(B, T, N_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.wv(x).view(B, T, N_HEADS, HEAD_DIM).transpose(1, 2)
        q = apply_rope_interleaved(q, cos, sin)
        k = apply_rope_interleaved(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm = RMSNorm(DIM)
        self.attention = Attention()
        self.ffn_norm = RMSNorm(DIM)
        self.feed_forward = FeedForward()
        cos, sin = rope_cos_sin(CTX)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * N_LAYERS) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x), self.rope_cos, self.rope_sin)
        return x + self.feed_forward(self.ffn_norm(x))


def prepare_8da4w(block: nn.Module) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    m = copy.deepcopy(block)
    quantize_(m, QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32),
        step="prepare",
    ))
    return m


def count_fake_quantizers(m: nn.Module) -> int:
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
    return sum(isinstance(x, IntxFakeQuantizer) for x in m.modules())


def time_steps(block, threads, warmup, rounds, per_round):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, CTX, DIM, generator=g).requires_grad_(True)
    runs = {}
    for name, m in (("float", copy.deepcopy(block)), ("8da4w", prepare_8da4w(block))):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
        runs[name] = {"m": m, "opt": opt, "tot": [], "fwd": [], "bwd": [], "opt_t": []}

    def one(r, record):
        t0 = time.perf_counter()
        r["opt"].zero_grad(set_to_none=True)
        x.grad = None
        loss = r["m"](x).square().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        r["opt"].step()
        t3 = time.perf_counter()
        if not math.isfinite(loss.item()):
            raise RuntimeError("non-finite loss")
        if record:
            r["tot"].append(t3 - t0)
            r["fwd"].append(t1 - t0)
            r["bwd"].append(t2 - t1)
            r["opt_t"].append(t3 - t2)

    la0 = os.getloadavg()[0]
    for r in runs.values():
        for _ in range(warmup):
            one(r, False)
    for _ in range(rounds):
        for r in runs.values():
            for _ in range(per_round):
                one(r, True)
    out = {}
    for name, r in runs.items():
        q = sorted(r["tot"])
        out[name] = {"median_ms": 1e3 * statistics.median(r["tot"]),
                     "p25_ms": 1e3 * q[len(q) // 4], "p75_ms": 1e3 * q[(3 * len(q)) // 4],
                     "fwd_ms": 1e3 * statistics.median(r["fwd"]), "bwd_ms": 1e3 * statistics.median(r["bwd"]),
                     "opt_ms": 1e3 * statistics.median(r["opt_t"]), "n": len(r["tot"])}
    out["_loadavg1"] = (la0, os.getloadavg()[0])
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-round", type=int, default=5)
    args = p.parse_args()

    import torchao
    torch.manual_seed(0)
    block = Block()
    n_params = sum(p.numel() for p in block.parameters())
    n_fq = count_fake_quantizers(prepare_8da4w(block))
    print(f"python {platform.python_version()}  torch {torch.__version__}  torchao {torchao.__version__}  "
          f"cpu count {os.cpu_count()}")
    print(f"one Llama block (dim {DIM}, {N_HEADS} heads x {HEAD_DIM}, SwiGLU {HIDDEN}), {n_params:,} parameters; "
          f"input {BATCH}x{CTX}x{DIM}; 8da4w inserts {n_fq} IntxFakeQuantizers (input + weight of 7 Linears)")
    print("step = zero_grad + forward + loss + backward + AdamW step; median over "
          f"{args.rounds} interleaved rounds x {args.per_round} steps after {args.warmup} warm-up steps")
    print(f"{'config':<7} {'threads':>7} {'median ms':>9} {'IQR ms':>13} {'fwd':>6} {'bwd':>6} {'AdamW':>6} "
          f"{'vs float':>8}")
    for th in args.threads:
        t = time_steps(block, th, args.warmup, args.rounds, args.per_round)
        base = t["float"]["median_ms"]
        for name in ("float", "8da4w"):
            r = t[name]
            print(f"{name:<7} {th:>7} {r['median_ms']:9.2f} {r['p25_ms']:6.2f}-{r['p75_ms']:6.2f} "
                  f"{r['fwd_ms']:6.2f} {r['bwd_ms']:6.2f} {r['opt_ms']:6.2f} {r['median_ms'] / base:7.2f}x")
        print(f"  (1-min loadavg before -> after, {th} thread(s): {t['_loadavg1'][0]:.2f} -> {t['_loadavg1'][1]:.2f})")


if __name__ == "__main__":
    main()
