#!/usr/bin/env python
"""(Copied unchanged from the project's shared reference, ../shared/reference/tinyllama_qat.py,
except DATA_PATH, which points at this repository's data/tinyshakespeare/input.txt. The step
timing against examples/shakespeare_qat.rs: benches/reference/shakespeare_step.sh.)

PyTorch + torchao reference: QAT of a tiny Llama-architecture character model on
tiny-shakespeare, fake-quantized to GGML Q4_0 / Q8_0 and to torchao schemes.

Commands (the ones that produced tinyllama_qat_results.txt; the two seed runs ran concurrently,
one thread each, i.e. one core each on the 2-core machine; then the timing alone; then the summary):

  cd ../shared/reference   # from the project root; a venv with torch, torchao, gguf, numpy
  python tinyllama_qat.py --seed 0 --threads 1 --skip-timing &
  python tinyllama_qat.py --seed 1 --threads 1 --skip-timing &
  wait
  python tinyllama_qat.py --timing-only --seed 0 --timing-threads 1 2   # ran 3 times
  python tinyllama_qat.py --eval-full --seed 0 --threads 1 &
  python tinyllama_qat.py --eval-full --seed 1 --threads 1 &
  wait
  python tinyllama_qat.py --summarize \
      --results-txt tinyllama_qat_results.txt

(Without --skip-timing a seed run also does the step timing at the end. --threads 2 gives the same
losses to the printed 4 decimals in the steps compared, but 2 OpenMP threads slow down ~6x when another
job takes a core, so the long runs used 1 thread.)

Each seed run writes <out-dir>/seed<N>.json, <out-dir>/seed<N>.txt (its printed output) and the
checkpoints float_seed<N>.pt, float_cont_seed<N>.pt, qat_<scheme>_seed<N>.pt (default out-dir
out/tinyllama_qat). --timing-only loads float_seed<N>.pt and writes timing_seed<N>_<time>.json.
--eval-full re-evaluates the saved checkpoints of a seed on the whole validation split (1742
non-overlapping windows) with paired-bootstrap 95% intervals for the recoveries -> fullval_seed<N>.json.
--summarize reads every seed*.json, timing_seed*.json and fullval_seed*.json there and writes the
per-seed outputs plus cross-seed tables.
Quick smoke test: --float-steps 30 --qat-steps 10 --skip-timing --out-dir out/tq_smoke

Data: shared/data/tinyshakespeare/input.txt; vocab = sorted set of characters (65);
first 90% of characters train, last 10% validation.

Model (same graph as candle-transformers 0.11 quantized_llama with general.architecture=llama,
so a GGUF export runs there; module names follow Meta Llama, GGUF names in brackets):
  tok_embeddings 65x128 [token_embd]; 4 x { attention_norm RMSNorm(eps 1e-5) [attn_norm];
  attention wq,wk,wv,wo 128->128 no bias [attn_q/k/v/output], 4 heads x 32, RoPE base 1e4 in the
  interleaved NORM convention (pairs 2i,2i+1; theta_i = 1/base^(2i/32), exactly as candle's
  precomput_freqs_cis + rope_i), causal softmax(q k^T / sqrt(32)) v; residual;
  ffn_norm RMSNorm [ffn_norm]; feed_forward w2(silu(w1 x) * w3 x), w1,w3 128->352, w2 352->128
  [ffn_gate, ffn_up, ffn_down]; residual }; norm RMSNorm [output_norm]; output 128->65 [output].
  Context 64. Init (llama2.c style): N(0, 0.02) for embedding and Linears, N(0, 0.02/sqrt(2*4))
  for wo and w2, RMSNorm weights 1.

Recipe: AdamW(betas 0.9/0.999, eps 1e-8, weight decay 0.1 on *all* parameters, one param group),
lr 3e-3, linear warm-up over 100 steps (lr = 3e-3*(s+1)/100), then cosine to 3e-4 at step 1500;
batch 32 random windows of 65 chars (64 inputs -> 64 targets); no grad clipping; float32.
Loss = mean cross-entropy over all 64 positions. Eval: 200 fixed windows of val (and of train),
drawn with --eval-seed (default 1234, the same for every --seed).
For each scheme, starting from the float checkpoint: PTQ = fake quant, no training; QAT = 300
steps AdamW lr 3e-4 cosine to 3e-5 (no warm-up, fresh optimizer, same batch stream for all
schemes), evaluated with the fake-quantized model. Control "float+300": the same 300 steps
without fake quantization (separates the effect of extra annealed training from QAT).
recovery = (L_PTQ - L_QAT) / (L_PTQ - L_float) * 100% (as specified; > 100% when the float checkpoint
is not converged, because the 300 QAT steps also continue training). Equal-budget recovery =
(L_PTQ(float+300) - L_QAT) / (L_PTQ(float+300) - L_float+300) * 100%, i.e. against the float model
given the same 300 extra steps and PTQ of that model.

Schemes (applied to every Linear in the blocks and the output Linear; not the embedding/norms):
  q4_0           weights GGML Q4_0 (blocks of 32 along the input dim; bit-identical to
                 gguf.quants Q4_0 quantize->dequantize, checked at run time), straight-through
                 gradient masked where the code was clamped at 15; Linear inputs GGML Q8_0 blocks
                 of 32 along the last dim (identity STE) - what candle's CPU QMatMul computes
                 (Q8_0 activations x Q4_0 weights).
  q8_0           weights Q8_0 and inputs Q8_0 (identity STE).
  torchao-8da4w  torchao QATConfig(activation_config=IntxFakeQuantizeConfig(torch.int8,
                 "per_token", is_symmetric=False), weight_config=IntxFakeQuantizeConfig(torch.int4,
                 group_size=32), step="prepare") via torchao.quantization.quantize_.
  int3-g32       torchao QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int3,
                 group_size=32)) (weight only).

Timing: per thread count (--timing-threads, default 1 2), for float and every scheme: fresh model
from the float checkpoint + fresh AdamW, 5 warm-up steps, then 30 timed steps taken round-robin
(6 rounds x 5 steps per config) on pre-drawn batches; a step = zero_grad + forward + loss +
backward + AdamW step; median ms, plus median forward / backward / optimizer split.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_PATH = str(Path(__file__).resolve().parents[2] / "data/tinyshakespeare/input.txt")
SCHEMES = ["q4_0", "q8_0", "torchao-8da4w", "int3-g32"]

VOCAB, DIM, N_LAYERS, N_HEADS, HIDDEN, CTX = 65, 128, 4, 4, 352, 64
HEAD_DIM = DIM // N_HEADS
NORM_EPS, ROPE_BASE = 1e-5, 10000.0

_LINES: list[str] = []


def log(s: str = "") -> None:
    print(s, flush=True)
    _LINES.append(s)


# ============================================================================ model
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_cos_sin(seq_len: int, head_dim: int = HEAD_DIM, base: float = ROPE_BASE):
    """candle quantized_llama precomput_freqs_cis: theta_i = 1 / base^(2i/head_dim) (f32)."""
    i = torch.arange(0, head_dim, 2, dtype=torch.float32)
    theta = 1.0 / torch.pow(torch.tensor(base, dtype=torch.float32), i / head_dim)
    ang = torch.arange(seq_len, dtype=torch.float32)[:, None] * theta[None, :]
    return ang.cos(), ang.sin()  # (T, head_dim/2)


def apply_rope_interleaved(x, cos, sin):
    """candle_nn::rotary_emb::rope_i: pairs (2i, 2i+1). x: (B, H, T, D)."""
    x = x.unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    o0 = x0 * cos - x1 * sin
    o1 = x0 * sin + x1 * cos
    return torch.stack((o0, o1), dim=-1).flatten(-2)


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
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(32)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)  # gate
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)  # down
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm = RMSNorm(DIM)
        self.attention = Attention()
        self.ffn_norm = RMSNorm(DIM)
        self.feed_forward = FeedForward()

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class TinyLlama(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block() for _ in range(N_LAYERS)])
        self.norm = RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        cos, sin = rope_cos_sin(CTX)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init()

    def _init(self):
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * N_LAYERS) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        h = self.tok_embeddings(idx)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))


def quantized_linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# ============================================================================ GGML fake quant
def _f16(d: torch.Tensor) -> torch.Tensor:
    return d.to(torch.float16).to(torch.float32)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), exact; same formula as gguf-py np_roundf. Returns +0 for 0."""
    a = v.abs()
    f = a.floor()
    r = f + (2.0 * (a - f)).floor()
    return r.copysign(v) + 0.0  # + 0.0 turns -0 into +0 (numpy goes through int8)


@torch.no_grad()
def q4_0_fake(w: torch.Tensor, return_mask: bool = False):
    """GGML Q4_0 quantize->dequantize along the last dim in blocks of 32 (ggml quantize_row_q4_0_ref):
    x_m = element of largest |x| (first on ties), d = x_m / -8, id = d ? 1/d : 0,
    q = min(15, trunc(x*id + 8.5)), y = f16(d) * (q - 8)."""
    shape = w.shape
    b = w.reshape(-1, 32)
    xm = b.gather(1, b.abs().argmax(dim=1, keepdim=True))
    d = xm / -8.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    t = torch.trunc(b * inv + 8.5)
    q = t.clamp_max(15.0)
    y = (_f16(d) * (q - 8.0)).reshape(shape)
    if return_mask:
        return y, (t <= 15.0).reshape(shape)
    return y


@torch.no_grad()
def q8_0_fake(x: torch.Tensor) -> torch.Tensor:
    """GGML Q8_0 along the last dim in blocks of 32 (ggml quantize_row_q8_0_ref, candle
    BlockQ8_0::from_float): d = amax/127, q = roundf(x * (d ? 1/d : 0)), y = f16(d) * q."""
    shape = x.shape
    b = x.reshape(-1, 32)
    d = b.abs().amax(dim=1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = _roundf(b * inv)
    return (_f16(d) * q).reshape(shape)


class _Q4_0STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        y, mask = q4_0_fake(w, return_mask=True)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask


class _Q8_0STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return q8_0_fake(x)

    @staticmethod
    def backward(ctx, g):
        return g  # |x*id| <= 127: never clamped


class GGMLFakeQuantLinear(nn.Module):
    """Linear (no bias) whose weight is GGML-fake-quantized (q4_0 / q8_0) and whose input is
    fake-quantized as Q8_0 (the vec_dot type of both in ggml/candle)."""

    def __init__(self, lin: nn.Linear, wtype: str, act_q8_0: bool = True):
        super().__init__()
        assert lin.bias is None and lin.in_features % 32 == 0
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = lin.weight
        self.wtype, self.act_q8_0 = wtype, act_q8_0

    def forward(self, x):
        if self.act_q8_0:
            x = _Q8_0STE.apply(x)
        w = _Q4_0STE.apply(self.weight) if self.wtype == "q4_0" else _Q8_0STE.apply(self.weight)
        return F.linear(x, w)

    def extra_repr(self):
        return f"{self.in_features}->{self.out_features}, w={self.wtype}, act={'q8_0' if self.act_q8_0 else 'f32'}"


def _swap_linears(model: nn.Module, fn) -> None:
    for name in quantized_linear_names(model):
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        child = name.rpartition(".")[2]
        setattr(parent, child, fn(getattr(parent, child)))


def apply_scheme(float_model: nn.Module, scheme: str) -> nn.Module:
    """Deep copy of float_model with fake quantization `scheme` on every Linear."""
    m = copy.deepcopy(float_model)
    if scheme in ("q4_0", "q8_0"):
        _swap_linears(m, lambda lin: GGMLFakeQuantLinear(lin, scheme, act_q8_0=True))
        return m
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    if scheme == "torchao-8da4w":
        cfg = QATConfig(
            activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
            weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32),
            step="prepare",
        )
    elif scheme == "int3-g32":
        cfg = QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int3, group_size=32), step="prepare")
    else:
        raise ValueError(scheme)
    quantize_(m, cfg)  # default filter: every nn.Linear (= the block Linears and `output`)
    return m


# ============================================================================ gguf-py check
def _bits_equal(a: np.ndarray, b: np.ndarray) -> int:
    a = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    b = np.ascontiguousarray(b, dtype=np.float32).view(np.uint32)
    return int((a != b).sum())


def check_against_gguf(model: nn.Module, sample_input: torch.Tensor) -> dict:
    import gguf
    from gguf import GGMLQuantizationType as QT

    def ref(a: np.ndarray, qt) -> np.ndarray:
        return gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt).reshape(a.shape)

    res = {"q4_0_weights": 0, "q8_0_weights": 0, "q8_0_activations": 0, "synthetic": 0,
           "n_weight_elems": 0, "n_act_elems": 0, "q4_0_clamped_frac": 0.0}
    n_clamped = 0
    for name in quantized_linear_names(model):
        w = model.get_submodule(name).weight.detach().float().contiguous()
        wn = w.numpy()
        y4, mask = q4_0_fake(w, return_mask=True)
        res["q4_0_weights"] += _bits_equal(y4.numpy(), ref(wn, QT.Q4_0))
        res["q8_0_weights"] += _bits_equal(q8_0_fake(w).numpy(), ref(wn, QT.Q8_0))
        res["n_weight_elems"] += w.numel()
        n_clamped += int((~mask).sum())
    res["q4_0_clamped_frac"] = n_clamped / res["n_weight_elems"]
    # activations: the inputs of every Linear on a real batch
    acts = []
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o: acts.append(i[0].detach().clone()))
             for n in quantized_linear_names(model)]
    with torch.no_grad():
        model(sample_input)
    for h in hooks:
        h.remove()
    for a in acts:
        a2 = a.reshape(-1, a.shape[-1]).contiguous()
        res["q8_0_activations"] += _bits_equal(q8_0_fake(a2).numpy(), ref(a2.numpy(), QT.Q8_0))
        res["n_act_elems"] += a2.numel()
    # synthetic edge cases: zero block, +/- ties on the max, values near .5 code boundaries, tiny
    g = torch.Generator().manual_seed(7)
    s = torch.randn(64, 128, generator=g)
    s[0, :32] = 0.0
    s[1, :32] = 0.0
    s[1, 3], s[1, 9] = 0.5, -0.5            # tie, first is positive
    s[2, 32:64] = 0.0
    s[2, 40], s[2, 41] = -0.25, 0.25         # tie, first is negative
    s[3, :] = torch.arange(128, dtype=torch.float32) / 127.0 - 0.5
    s[4, :] *= 1e-6
    # Q8_0 roundf corners: amax 127 -> d = 1, so x*id = x: ties at .5 and the float just below 0.5
    s[5, :32] = torch.tensor([127.0, 0.5 - 2**-25, -(0.5 - 2**-25), 2.5, -2.5, 0.5, -0.5, 1.5] * 4)
    sn = s.numpy()
    res["synthetic"] += _bits_equal(q4_0_fake(s).numpy(), ref(sn, QT.Q4_0))
    res["synthetic"] += _bits_equal(q8_0_fake(s).numpy(), ref(sn, QT.Q8_0))
    res["ok"] = all(res[k] == 0 for k in ("q4_0_weights", "q8_0_weights", "q8_0_activations", "synthetic"))
    return res


# ============================================================================ data / train / eval
def load_data():
    text = open(DATA_PATH, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    return text, chars, data[:n], data[n:]


def windows(data: torch.Tensor, starts: torch.Tensor):
    idx = starts[:, None] + torch.arange(CTX + 1)[None, :]
    w = data[idx]
    return w[:, :-1], w[:, 1:]


def sample_batch(data, bs, gen):
    starts = torch.randint(0, len(data) - CTX, (bs,), generator=gen)
    return windows(data, starts)


def fixed_eval_set(data, n, seed):
    g = torch.Generator().manual_seed(seed)
    return windows(data, torch.randint(0, len(data) - CTX, (n,), generator=g))


@torch.no_grad()
def evaluate(model, evset, chunk=100) -> float:
    model.eval()
    x, y = evset
    tot, cnt = 0.0, 0
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk])
        tot += F.cross_entropy(logits.reshape(-1, VOCAB), y[i:i + chunk].reshape(-1), reduction="sum").item()
        cnt += y[i:i + chunk].numel()
    model.train()
    return tot / cnt


def lr_at(step, total, lr_max, lr_min, warmup):
    if step < warmup:
        return lr_max * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * p))


def make_opt(model, lr, wd):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)


def train(model, train_data, steps, lr_max, lr_min, warmup, wd, bs, batch_seed, evset=None, eval_every=0,
          tag=""):
    opt = make_opt(model, lr_max, wd)
    gen = torch.Generator().manual_seed(batch_seed)
    model.train()
    curve, t_eval, step_s = [], 0.0, []
    t0 = time.perf_counter()
    ema = None
    for step in range(steps):
        ts = time.perf_counter()
        lr = lr_at(step, steps, lr_max, lr_min, warmup)
        for pg in opt.param_groups:
            pg["lr"] = lr
        x, y = sample_batch(train_data, bs, gen)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = loss.item()
        step_s.append(time.perf_counter() - ts)
        if not math.isfinite(lv):
            raise RuntimeError(f"{tag}: non-finite loss at step {step}")
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if evset is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            te = time.perf_counter()
            vl = evaluate(model, evset)
            t_eval += time.perf_counter() - te
            curve.append((step + 1, round(ema, 4), round(vl, 4)))
            log(f"  [{tag}] step {step + 1:5d}  lr {lr:.2e}  train(ema) {ema:.4f}  val {vl:.4f}  "
                f"{time.perf_counter() - t0:7.1f}s")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "wall_s_excl_eval": wall - t_eval, "curve": curve, "final_train_ema": ema,
            "median_step_ms": 1e3 * statistics.median(step_s)}


@torch.no_grad()
def greedy(model, stoi, itos, prompt="ROMEO:", n=200) -> str:
    model.eval()
    ids = [stoi[c] for c in prompt]
    for _ in range(n):
        ctx = torch.tensor([ids[-CTX:]], dtype=torch.long)
        ids.append(int(model(ctx)[0, -1].argmax()))
    model.train()
    return "".join(itos[i] for i in ids)


# ============================================================================ timing
def time_steps(float_model, train_data, configs, threads, warm=5, rounds=6, per_round=5, bs=32, seed=999):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    n_b = warm + rounds * per_round
    batches = [sample_batch(train_data, bs, gen) for _ in range(n_b)]
    runs = {}
    for c in configs:
        m = copy.deepcopy(float_model) if c == "float" else apply_scheme(float_model, c)
        m.train()
        runs[c] = {"m": m, "opt": make_opt(m, 3e-4, 0.1), "i": 0, "tot": [], "fwd": [], "bwd": [], "opt_t": [],
                   "cpu": []}

    def one(r, record):
        x, y = batches[r["i"] % n_b]
        r["i"] += 1
        c0 = time.process_time()
        t0 = time.perf_counter()
        r["opt"].zero_grad(set_to_none=True)
        loss = F.cross_entropy(r["m"](x).reshape(-1, VOCAB), y.reshape(-1))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        r["opt"].step()
        t3 = time.perf_counter()
        c3 = time.process_time()
        if record:
            r["cpu"].append(c3 - c0)
            r["tot"].append(t3 - t0)
            r["fwd"].append(t1 - t0)
            r["bwd"].append(t2 - t1)
            r["opt_t"].append(t3 - t2)

    la0 = os.getloadavg()[0]
    for c in configs:
        for _ in range(warm):
            one(runs[c], False)
    for _ in range(rounds):
        for c in configs:
            for _ in range(per_round):
                one(runs[c], True)
    out = {}
    for c in configs:
        r = runs[c]
        q = sorted(r["tot"])
        out[c] = {
            "median_ms": 1e3 * statistics.median(r["tot"]),
            "p25_ms": 1e3 * q[len(q) // 4], "p75_ms": 1e3 * q[(3 * len(q)) // 4],
            "fwd_ms": 1e3 * statistics.median(r["fwd"]), "bwd_ms": 1e3 * statistics.median(r["bwd"]),
            "opt_ms": 1e3 * statistics.median(r["opt_t"]), "n": len(r["tot"]),
            "cpu_per_wall": sum(r["cpu"]) / sum(r["tot"]),
        }
    out["_loadavg1"] = [la0, os.getloadavg()[0]]
    return out


# ============================================================================ reporting
def env_lines():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        la = os.getloadavg()
    except OSError:
        la = (float("nan"),) * 3
    import torchao
    return [f"python {platform.python_version()}  torch {torch.__version__}  torchao {torchao.__version__}  "
            f"numpy {np.__version__}",
            f"cpu: {cpu}  os.cpu_count()={os.cpu_count()}  loadavg(1,5,15)={la[0]:.2f},{la[1]:.2f},{la[2]:.2f}"]


def fmt_table(headers, rows):
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(headers), line(["-" * x for x in w])] + [line(r) for r in rows])


def recovery(ptq, qat, flt):
    gap = ptq - flt
    return float("nan") if abs(gap) < 1e-12 else 100.0 * (ptq - qat) / gap


LOSS_HEADERS = ["scheme", "seed", "val float", "val PTQ", "val QAT", "recovery", "val float+300",
                "val PTQ(float+300)", "eq-budget recovery", "train PTQ", "train QAT"]


def loss_rows(res):
    """recovery = spec formula vs the float checkpoint; eq-budget recovery uses the float model trained
    for the same extra steps without fake quant (float+300) and PTQ of that model as the reference."""
    f, fc = res["float"]["val"], res["float_cont"]["val"]
    rows = []
    for s, r in res["schemes"].items():
        cp = res.get("control_ptq", {}).get(s, {}).get("val", float("nan"))
        rows.append([s, res["args"]["seed"], f"{f:.4f}", f"{r['ptq_val']:.4f}", f"{r['qat_val']:.4f}",
                     f"{recovery(r['ptq_val'], r['qat_val'], f):.0f}%", f"{fc:.4f}", f"{cp:.4f}",
                     f"{recovery(cp, r['qat_val'], fc):.0f}%", f"{r['ptq_train']:.4f}", f"{r['qat_train']:.4f}"])
    return rows


def print_loss_table(res):
    f = res["float"]
    log(f"float checkpoint: val {f['val']:.4f}  train {f['train']:.4f}   "
        f"float+{res['args']['qat_steps']} (control, no FQ): val {res['float_cont']['val']:.4f}  "
        f"train {res['float_cont']['train']:.4f}")
    log(fmt_table(LOSS_HEADERS, loss_rows(res)))


def print_timing(timing):
    rows = []
    las = []
    for th in sorted(timing, key=int):
        base = timing[th]["float"]["median_ms"]
        for c, t in timing[th].items():
            if c.startswith("_"):
                continue
            rows.append([c, th, f"{t['median_ms']:.1f}", f"{t['p25_ms']:.1f}-{t['p75_ms']:.1f}",
                         f"{t['fwd_ms']:.1f}", f"{t['bwd_ms']:.1f}", f"{t['opt_ms']:.1f}",
                         f"{t['median_ms'] / base:.2f}x", f"{t.get('cpu_per_wall', float('nan')):.2f}", t["n"]])
        if "_loadavg1" in timing[th]:
            las.append(f"{th} thr: {timing[th]['_loadavg1'][0]:.2f}->{timing[th]['_loadavg1'][1]:.2f}")
    log(fmt_table(["config", "threads", "median ms/step", "IQR ms", "fwd", "bwd", "AdamW", "vs float",
                   "cpu/wall", "n"], rows))
    if las:
        log("  (cpu/wall = process CPU time / wall time over the timed steps; 1-min loadavg before->after: "
            + "; ".join(las) + ")")


# ============================================================================ main
def run(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for l in env_lines():
        log(l)
    log(f"args: {vars(args)}")
    text, chars, train_data, val_data = load_data()
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    log(f"data: {len(text):,} chars, vocab {len(chars)}, train {len(train_data):,}, val {len(val_data):,}")
    assert len(chars) == VOCAB
    ev_val = fixed_eval_set(val_data, args.eval_windows, args.eval_seed)
    ev_train = fixed_eval_set(train_data, args.eval_windows, args.eval_seed + 1)

    model = TinyLlama()
    n_params = sum(p.numel() for p in model.parameters())
    n_q = sum(model.get_submodule(n).weight.numel() for n in quantized_linear_names(model))
    log(f"model: {n_params:,} parameters ({n_q:,} in the {len(quantized_linear_names(model))} quantized Linears)")
    res = {"args": vars(args), "env": env_lines(), "n_params": n_params}

    # ---------------------------------------------------------------- float phase
    log(f"\n== float training: {args.float_steps} steps, threads {args.threads}")
    tr = train(model, train_data, args.float_steps, args.lr, args.lr_min, args.warmup, args.wd, args.batch,
               batch_seed=args.seed * 1000 + 1, evset=ev_val, eval_every=args.eval_every, tag="float")
    float_state = copy.deepcopy(model.state_dict())
    torch.save(float_state, out_dir / f"float_seed{args.seed}.pt")
    res["float"] = {"val": evaluate(model, ev_val), "train": evaluate(model, ev_train), **tr}
    log(f"float phase wall {tr['wall_s']:.1f}s ({tr['wall_s_excl_eval']:.1f}s excluding evals, median step "
        f"{tr['median_step_ms']:.1f} ms incl. batch sampling): "
        f"val {res['float']['val']:.4f} train {res['float']['train']:.4f}")

    # ---------------------------------------------------------------- gguf-py bit-exactness
    chk = check_against_gguf(model, ev_val[0][:32])
    res["gguf_check"] = chk
    log(f"\n== gguf-py check (torch fake quant vs gguf.quants.dequantize(quantize(.))): "
        f"{'BIT-IDENTICAL' if chk['ok'] else 'MISMATCH'}  {chk}")
    if not chk["ok"]:
        raise SystemExit("torch GGML fake quant differs from gguf-py")

    # ---------------------------------------------------------------- float control (+qat_steps)
    qat_batch_seed = args.seed * 1000 + 2
    log(f"\n== float control: {args.qat_steps} more steps without fake quant (lr {args.qat_lr}->{args.qat_lr_min})")
    fc = copy.deepcopy(model)
    trc = train(fc, train_data, args.qat_steps, args.qat_lr, args.qat_lr_min, 0, args.wd, args.batch,
                batch_seed=qat_batch_seed, evset=ev_val, eval_every=args.qat_eval_every, tag="float+")
    res["float_cont"] = {"val": evaluate(fc, ev_val), "train": evaluate(fc, ev_train), **trc}
    torch.save(fc.state_dict(), out_dir / f"float_cont_seed{args.seed}.pt")
    res["control_ptq"] = {}
    for s in args.schemes:
        mc = apply_scheme(fc, s)
        res["control_ptq"][s] = {"val": evaluate(mc, ev_val), "train": evaluate(mc, ev_train)}
        log(f"  PTQ {s} of the float+{args.qat_steps} control: val {res['control_ptq'][s]['val']:.4f}  "
            f"train {res['control_ptq'][s]['train']:.4f}")
    del fc, mc

    # ---------------------------------------------------------------- PTQ / QAT per scheme
    res["schemes"] = {}
    samples = {"float": greedy(model, stoi, itos)}
    for s in args.schemes:
        log(f"\n== scheme {s}")
        m = apply_scheme(model, s)
        ptq_val, ptq_train = evaluate(m, ev_val), evaluate(m, ev_train)
        log(f"  PTQ: val {ptq_val:.4f}  train {ptq_train:.4f}")
        if s == "q4_0":
            samples["q4_0 PTQ"] = greedy(m, stoi, itos)
        trq = train(m, train_data, args.qat_steps, args.qat_lr, args.qat_lr_min, 0, args.wd, args.batch,
                    batch_seed=qat_batch_seed, evset=ev_val, eval_every=args.qat_eval_every, tag=f"QAT {s}")
        qat_val, qat_train = evaluate(m, ev_val), evaluate(m, ev_train)
        log(f"  QAT: val {qat_val:.4f}  train {qat_train:.4f}  wall {trq['wall_s']:.1f}s "
            f"({trq['wall_s_excl_eval']:.1f}s excl. evals, median step {trq['median_step_ms']:.1f} ms)  recovery "
            f"{recovery(ptq_val, qat_val, res['float']['val']):.1f}%")
        res["schemes"][s] = {"ptq_val": ptq_val, "ptq_train": ptq_train, "qat_val": qat_val,
                             "qat_train": qat_train, **trq}
        if s == "q4_0":
            samples["q4_0 QAT"] = greedy(m, stoi, itos)
        torch.save(m.state_dict(), out_dir / f"qat_{s}_seed{args.seed}.pt")
        del m
    res["samples"] = samples

    # ---------------------------------------------------------------- timing
    res["timing"] = {}
    if not args.skip_timing:
        for th in args.timing_threads:
            log(f"\n== step timing, {th} thread(s) ...")
            res["timing"][str(th)] = time_steps(model, train_data, ["float"] + list(args.schemes), th)
        torch.set_num_threads(args.threads)

    # ---------------------------------------------------------------- report
    log(f"\n================ RESULTS seed {args.seed} ================")
    print_loss_table(res)
    log(f"\nwall time (threads {args.threads}; 'step' = median in-phase step incl. batch sampling):")
    log(f"  float phase ({args.float_steps} steps) {res['float']['wall_s']:.1f}s "
        f"({res['float']['wall_s_excl_eval']:.1f}s excl. evals), step {res['float']['median_step_ms']:.1f} ms")
    for s, r in res["schemes"].items():
        log(f"  QAT {s} ({args.qat_steps} steps) {r['wall_s']:.1f}s ({r['wall_s_excl_eval']:.1f}s excl. evals), "
            f"step {r['median_step_ms']:.1f} ms")
    fc_ = res['float_cont']
    log(f"  float control ({args.qat_steps} steps) {fc_['wall_s']:.1f}s ({fc_['wall_s_excl_eval']:.1f}s excl. evals), "
        f"step {fc_['median_step_ms']:.1f} ms")
    if res["timing"]:
        log("\nstep time (zero_grad + fwd + loss + bwd + AdamW), batch 32 x 64 tokens:")
        print_timing(res["timing"])
    for k, v in samples.items():
        log(f"\n-- greedy sample, {k} model (prompt 'ROMEO:', 200 chars):\n{v}")
    try:
        la = os.getloadavg()
        log(f"\nloadavg at end (1,5,15): {la[0]:.2f},{la[1]:.2f},{la[2]:.2f}")
    except OSError:
        pass
    res["log"] = list(_LINES)
    with open(out_dir / f"seed{args.seed}.json", "w") as f:
        json.dump(res, f, indent=1)
    with open(out_dir / f"seed{args.seed}.txt", "w") as f:
        f.write("\n".join(_LINES) + "\n")


@torch.no_grad()
def per_window_losses(model, evset, chunk=100) -> torch.Tensor:
    model.eval()
    x, y = evset
    out = []
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk])
        l = F.cross_entropy(logits.reshape(-1, VOCAB), y[i:i + chunk].reshape(-1), reduction="none")
        out.append(l.view(-1, CTX).mean(1))
    model.train()
    return torch.cat(out)


def eval_full(args):
    """Supplement: evaluate the saved checkpoints of one seed on the whole validation split (all
    non-overlapping 64-token windows) and bootstrap (over windows, paired) the recoveries."""
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    res = json.load(open(out_dir / f"seed{args.seed}.json"))
    _, _, train_data, val_data = load_data()
    n = (len(val_data) - 1) // CTX
    full = windows(val_data, torch.arange(n) * CTX)
    ev200 = fixed_eval_set(val_data, args.eval_windows, args.eval_seed)

    def load(path, scheme=None):
        m = TinyLlama()
        if scheme is not None:
            m = apply_scheme(m, scheme)
        m.load_state_dict(torch.load(path))
        return m

    fl, fc = load(out_dir / f"float_seed{args.seed}.pt"), load(out_dir / f"float_cont_seed{args.seed}.pt")
    assert abs(evaluate(fl, ev200) - res["float"]["val"]) < 1e-6, "float checkpoint does not reproduce"
    assert abs(evaluate(fc, ev200) - res["float_cont"]["val"]) < 1e-6, "control checkpoint does not reproduce"
    L = {"float": per_window_losses(fl, full), "float_cont": per_window_losses(fc, full)}
    for s in args.schemes:
        L[f"ptq_{s}"] = per_window_losses(apply_scheme(fl, s), full)
        L[f"ptqc_{s}"] = per_window_losses(apply_scheme(fc, s), full)
        mq = load(out_dir / f"qat_{s}_seed{args.seed}.pt", s)
        assert abs(evaluate(mq, ev200) - res["schemes"][s]["qat_val"]) < 1e-6, f"qat {s} does not reproduce"
        L[f"qat_{s}"] = per_window_losses(mq, full)
    g = torch.Generator().manual_seed(0)
    boot = torch.randint(0, n, (args.n_boot, n), generator=g)

    def rec_ci(a, b, c):  # recovery (a - b) / (a - c), paired bootstrap over windows
        pa, pb, pc = (L[k][boot].mean(1) for k in (a, b, c))
        r = 100.0 * (pa - pb) / (pa - pc)
        return [float(r.quantile(0.025)), float(r.quantile(0.975))]

    def se(a, b):
        d = L[a] - L[b]
        return float(d.std() / math.sqrt(n))

    out = {"n_windows": n, "n_tokens": n * CTX, "mean": {k: float(v.mean()) for k, v in L.items()}, "schemes": {}}
    m = out["mean"]
    for s in args.schemes:
        out["schemes"][s] = {
            "recovery": recovery(m[f"ptq_{s}"], m[f"qat_{s}"], m["float"]),
            "recovery_ci95": rec_ci(f"ptq_{s}", f"qat_{s}", "float"),
            "eq_recovery": recovery(m[f"ptqc_{s}"], m[f"qat_{s}"], m["float_cont"]),
            "eq_recovery_ci95": rec_ci(f"ptqc_{s}", f"qat_{s}", "float_cont"),
            "se_ptqc_minus_cont": se(f"ptqc_{s}", "float_cont"),
            "se_qat_minus_cont": se(f"qat_{s}", "float_cont"),
        }
    with open(out_dir / f"fullval_seed{args.seed}.json", "w") as f:
        json.dump(out, f, indent=1)
    print_fullval(args.seed, out)


def print_fullval(seed, out):
    m = out["mean"]
    log(f"\nfull validation split, seed {seed}: {out['n_windows']} non-overlapping windows "
        f"({out['n_tokens']:,} tokens); float {m['float']:.4f}, float+300 {m['float_cont']:.4f}; "
        f"95% CIs: paired bootstrap over windows")
    rows = []
    for s, r in out["schemes"].items():
        rows.append([s, seed, f"{m[f'ptq_{s}']:.4f}", f"{m[f'qat_{s}']:.4f}",
                     f"{r['recovery']:.0f}% [{r['recovery_ci95'][0]:.0f},{r['recovery_ci95'][1]:.0f}]",
                     f"{m[f'ptqc_{s}']:.4f}",
                     f"{m[f'ptqc_{s}'] - m['float_cont']:+.4f}+-{r['se_ptqc_minus_cont']:.4f}",
                     f"{m[f'qat_{s}'] - m['float_cont']:+.4f}+-{r['se_qat_minus_cont']:.4f}",
                     f"{r['eq_recovery']:.0f}% [{r['eq_recovery_ci95'][0]:.0f},{r['eq_recovery_ci95'][1]:.0f}]"])
    log(fmt_table(["scheme", "seed", "val PTQ", "val QAT", "recovery [CI]", "PTQ(float+300)",
                   "PTQ(f+300)-(f+300) +-se", "QAT-(f+300) +-se", "eq-budget recovery [CI]"], rows))


def timing_only(args):
    """Re-measure step times from a saved float checkpoint (for when the main run's timing phase was
    disturbed by other jobs on the machine)."""
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    for l in env_lines():
        log(l)
    _, _, train_data, _ = load_data()
    model = TinyLlama()
    model.load_state_dict(torch.load(out_dir / f"float_seed{args.seed}.pt"))
    timing = {}
    for th in args.timing_threads:
        log(f"== step timing, {th} thread(s) ...")
        timing[str(th)] = time_steps(model, train_data, ["float"] + list(args.schemes), th)
    stamp = time.strftime("%H%M%S")
    log(f"\nstep time re-measured at {time.strftime('%Y-%m-%d %H:%M:%S')} from float_seed{args.seed}.pt "
        "(zero_grad + fwd + loss + bwd + AdamW), batch 32 x 64 tokens:")
    print_timing(timing)
    with open(out_dir / f"timing_seed{args.seed}_{stamp}.json", "w") as f:
        json.dump({"seed": args.seed, "timing": timing, "log": list(_LINES)}, f, indent=1)


def summarize(args):
    files = sorted(glob.glob(str(Path(args.out_dir) / "seed*.json")))
    runs = [json.load(open(f)) for f in files]
    out = []
    for r in runs:
        out += [f"######## seed {r['args']['seed']} (printed output of the run)", *r["log"], ""]
    _LINES.clear()
    log(f"######## summary over seeds {[r['args']['seed'] for r in runs]}")
    rows = [row for r in runs for row in loss_rows(r)]
    rows.sort(key=lambda x: (SCHEMES.index(x[0]) if x[0] in SCHEMES else 99, x[1]))
    log(fmt_table(LOSS_HEADERS, rows))
    if len(runs) > 1:
        log("\nmean over seeds (recoveries: mean of the per-seed values):")
        mrows = []
        for s in SCHEMES:
            vs = [r for r in runs if s in r["schemes"]]
            if not vs:
                continue
            mean = lambda fn: statistics.mean(fn(r) for r in vs)
            cpv = lambda r: r.get("control_ptq", {}).get(s, {}).get("val", float("nan"))
            mrows.append([s, f"{mean(lambda r: r['float']['val']):.4f}",
                          f"{mean(lambda r: r['schemes'][s]['ptq_val']):.4f}",
                          f"{mean(lambda r: r['schemes'][s]['qat_val']):.4f}",
                          f"{mean(lambda r: recovery(r['schemes'][s]['ptq_val'], r['schemes'][s]['qat_val'], r['float']['val'])):.0f}%",
                          f"{mean(lambda r: r['float_cont']['val']):.4f}", f"{mean(cpv):.4f}",
                          f"{mean(lambda r: recovery(cpv(r), r['schemes'][s]['qat_val'], r['float_cont']['val'])):.0f}%"])
        log(fmt_table(["scheme", "val float", "val PTQ", "val QAT", "recovery", "val float+300",
                       "val PTQ(float+300)", "eq-budget recovery"], mrows))
    for f in sorted(glob.glob(str(Path(args.out_dir) / "fullval_seed*.json"))):
        print_fullval(int(Path(f).stem.replace("fullval_seed", "")), json.load(open(f)))
    for r in runs:
        if r["timing"]:
            log(f"\nstep time, measured inside the seed {r['args']['seed']} run:")
            print_timing(r["timing"])
    for f in sorted(glob.glob(str(Path(args.out_dir) / "timing_seed*_*.json"))):
        t = json.load(open(f))
        log(f"\nstep time, separate --timing-only run {Path(f).name}:")
        print_timing(t["timing"])
    tfiles = sorted(glob.glob(str(Path(args.out_dir) / "timing_seed*_*.json")))
    if len(tfiles) > 1:
        ts = [json.load(open(f))["timing"] for f in tfiles]
        log(f"\nstep time over the {len(ts)} --timing-only runs: median of the per-run medians "
            "[min-max of the per-run medians], ms per step")
        rows = []
        for th in sorted(ts[0], key=int):
            for c in ts[0][th]:
                if c.startswith("_"):
                    continue
                v = [t[th][c]["median_ms"] for t in ts]
                fb = [t[th]["float"]["median_ms"] for t in ts]
                rows.append([c, th, f"{statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]",
                             f"{statistics.median([t[th][c]['fwd_ms'] for t in ts]):.1f}",
                             f"{statistics.median([t[th][c]['bwd_ms'] for t in ts]):.1f}",
                             f"{statistics.median([t[th][c]['opt_ms'] for t in ts]):.1f}",
                             f"{statistics.median([a / b for a, b in zip(v, fb)]):.2f}x"])
        log(fmt_table(["config", "threads", "median ms/step [range]", "fwd", "bwd", "AdamW", "vs float"], rows))
    text = "\n".join(out + _LINES) + "\n"
    if args.results_txt:
        Path(args.results_txt).write_text(text)
        print(f"wrote {args.results_txt}")


def main():
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for training/eval")
    p.add_argument("--timing-threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--float-steps", type=int, default=1500)
    p.add_argument("--qat-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-min", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--qat-lr", type=float, default=3e-4)
    p.add_argument("--qat-lr-min", type=float, default=3e-5)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=200)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--qat-eval-every", type=int, default=100)
    p.add_argument("--schemes", nargs="+", default=SCHEMES, choices=SCHEMES)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--out-dir", default="out/tinyllama_qat")
    p.add_argument("--summarize", action="store_true", help="combine <out-dir>/seed*.json")
    p.add_argument("--timing-only", action="store_true", help="only the step timing, from <out-dir>/float_seed<N>.pt")
    p.add_argument("--eval-full", action="store_true",
                   help="evaluate the saved checkpoints of --seed on the whole val split (+ bootstrap CIs)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--results-txt", default=None)
    args = p.parse_args()
    if args.summarize:
        summarize(args)
    elif args.timing_only:
        timing_only(args)
    elif args.eval_full:
        eval_full(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
