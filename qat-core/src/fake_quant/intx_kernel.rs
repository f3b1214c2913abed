//! The CPU kernels of intx fake quantization (torchao's `IntxFakeQuantizer`): per-group
//! qparams, forward and straight-through backward over f32 slices, one group at a time so
//! that a dynamic forward reads its input once (the group's min/max, then its codes, while
//! it is in L1). The f32 inner loops are compiled for baseline x86-64 and AVX2 (the dynamic
//! forward also for AVX-512F), chosen at run time; f16/bf16 data runs the same arithmetic
//! in f32 with a rounding to the dtype after each step where PyTorch rounds (see
//! [`Narrow`]).
//!
//! Arithmetic, as torchao with PyTorch's CPU kernels: `t = x * (1/scale)` in f32, the code
//! `q = clamp(round_half_even(t) + zp, qmin, qmax)`, `y = (q - zp) * scale`; the gradient is
//! `(dy * scale) * (1/scale)` where `qmin < round(t) + zp < qmax` (strictly: PyTorch 2.15's
//! clamp passes no gradient at the bounds, as the golden cases show) and 0 elsewhere.

use std::mem::MaybeUninit;

use multiversion::multiversion;
use rayon::prelude::*;

use super::kernel::round_small;
use crate::host::{alloc_with, CHUNK};

/// The largest |zero point| the kernels take: `qmin - zp` and `qmax - zp` stay exact and
/// the clamped `t` rounds exactly with the 1.5 * 2^23 trick.
pub(crate) const MAX_ZERO_POINT: f32 = (1 << 21) as f32;

/// The float format the data is in: f32 runs as is; f16/bf16 round each intermediate to
/// the format, as PyTorch's ops on f16/bf16 tensors do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Narrow {
    F32,
    F16,
    BF16,
}

impl Narrow {
    /// Rounds an f32 to this format (nearest, ties to even) and back.
    #[inline(always)]
    pub fn round(self, v: f32) -> f32 {
        match self {
            Narrow::F32 => v,
            Narrow::F16 => half::f16::from_f32(v).to_f32(),
            Narrow::BF16 => half::bf16::from_f32(v).to_f32(),
        }
    }

    /// `torch.finfo(dtype).smallest_normal`.
    pub fn smallest_normal(self) -> f32 {
        match self {
            Narrow::F16 => half::f16::MIN_POSITIVE.to_f32(),
            Narrow::F32 | Narrow::BF16 => f32::MIN_POSITIVE,
        }
    }
}

/// How a group's scale and zero point follow from its min and max.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Rule {
    /// `choose_qparams_affine` SYMMETRIC: `max(-min(min,0), max(max,0)) / div`, zp 0.
    Symmetric { div: f32 },
    /// `choose_qparams_affine` ASYMMETRIC: `(max(max,0) - min(min,0)) / (qmax - qmin)`,
    /// `zp = clamp(qmin - round(min(min,0) / scale), qmin, qmax)`.
    Asymmetric,
    /// `_choose_qparams_affine_tinygemm` then `.to(int32)`: `(max - min) / (2^b - 1)`,
    /// `zp = trunc(min + scale * 2^(b-1))`.
    Tinygemm { levels: f32, mid: f32 },
}

/// Everything a kernel needs to compute qparams: the rule, the code range, the scale floor
/// (already in the data's format) and the format.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct QRule {
    pub rule: Rule,
    pub qmin: f32,
    pub qmax: f32,
    pub eps: f32,
    pub narrow: Narrow,
}

impl QRule {
    /// `(scale, zero_point)` of a group with these min, max and NaN flag. A group with a NaN
    /// gets a NaN scale and zero point (torchao's scale is NaN there too, and every output
    /// of the group is NaN either way).
    #[inline(always)]
    pub fn qparams(&self, min: f32, max: f32, nan: bool) -> (f32, f32) {
        if nan {
            return (f32::NAN, f32::NAN);
        }
        let n = |v: f32| self.narrow.round(v);
        // torch.clamp(min=eps): NaN stays NaN.
        let floor = |s: f32| if s < self.eps { self.eps } else { s };
        match self.rule {
            Rule::Symmetric { div } => {
                let amax = (-min.min(0.0)).max(max.max(0.0));
                (floor(n(amax / div)), 0.0)
            }
            Rule::Asymmetric => {
                let (lo, hi) = (min.min(0.0), max.max(0.0));
                let s = floor(n(n(hi - lo) / (self.qmax - self.qmin)));
                let z = self.qmin - n(lo / s).round_ties_even();
                (s, z.clamp(self.qmin, self.qmax))
            }
            Rule::Tinygemm { levels, mid } => {
                let s = floor(n(n(max - min) / levels));
                (s, n(min + n(s * mid)).trunc())
            }
        }
    }
}

/// [`min_max_tree`] of one slice.
#[multiversion(targets("x86_64+avx2"))]
pub(crate) fn min_max(x: &[f32]) -> (f32, f32, bool) {
    min_max_tree(x)
}

/// [`min_max_tree`] of each group of `len` of `x`.
#[multiversion(targets("x86_64+avx2"))]
fn min_max_block(x: &[f32], len: usize, out: &mut Vec<(f32, f32, bool)>) {
    out.clear();
    out.extend(x.chunks(len).map(min_max_tree));
}

/// The `t` whose code `round_half_even(t)` lies strictly between the integers `lo` and
/// `hi`, as `in_lo <= t <= in_hi` (empty when there is no such code, or for NaN bounds).
/// `round_half_even(t) >= a` iff `t >= a - 0.5` when that tie rounds up to `a` (a even),
/// `t > a - 0.5` otherwise, i.e. `t >= next_up(a - 0.5)`; likewise `<= b`, with `a = lo +
/// 1`, `b = hi - 1`. Branch-free (`a - 0.5` is never 0, so the neighbour is one ulp in the
/// bits), so that it vectorises over groups.
#[inline(always)]
fn strict_bounds(lo: f32, hi: f32) -> (f32, f32) {
    let (a, b) = (lo + 1.0, hi - 1.0);
    let (la, hb) = (a - 0.5, b + 0.5);
    let away = |v: f32, up: bool| {
        let bits = v.to_bits();
        f32::from_bits(if (v > 0.0) == up {
            bits.wrapping_add(1)
        } else {
            bits.wrapping_sub(1)
        })
    };
    let in_lo = if (a as i32) & 1 == 0 {
        la
    } else {
        away(la, true)
    };
    let in_hi = if (b as i32) & 1 == 0 {
        hb
    } else {
        away(hb, false)
    };
    if a <= b {
        (in_lo, in_hi)
    } else {
        (f32::INFINITY, f32::NEG_INFINITY)
    }
}

/// Min, max and NaN flag of one group with a tree reduction of the lanes (select-based, so
/// that it maps to vector min/max; the values are those of a sequential scan up to the
/// sign of a zero, which no qparams rule distinguishes). Element `j` of the whole chunks
/// goes to lane `j % LANES`, the tail to lanes `0..`; the NaN flags are all-ones masks, two
/// chunks checked by one unordered comparison.
#[inline(always)]
fn min_max_lanes<const LANES: usize>(x: &[f32]) -> (f32, f32, bool) {
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let mut nan = [0i32; LANES];
    let mut pairs = x.chunks_exact(2 * LANES);
    for c in &mut pairs {
        let (a, b) = c.split_at(LANES);
        for i in 0..LANES {
            let (u, v) = (a[i], b[i]);
            lo[i] = if u < lo[i] { u } else { lo[i] };
            hi[i] = if u > hi[i] { u } else { hi[i] };
            lo[i] = if v < lo[i] { v } else { lo[i] };
            hi[i] = if v > hi[i] { v } else { hi[i] };
            nan[i] |= -((u.is_nan() | v.is_nan()) as i32);
        }
    }
    let mut chunks = pairs.remainder().chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let v = c[i];
            lo[i] = if v < lo[i] { v } else { lo[i] };
            hi[i] = if v > hi[i] { v } else { hi[i] };
            nan[i] |= -(v.is_nan() as i32);
        }
    }
    for (i, &v) in chunks.remainder().iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
        nan[i] |= -(v.is_nan() as i32);
    }
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            lo[i] = if lo[i + w] < lo[i] { lo[i + w] } else { lo[i] };
            hi[i] = if hi[i + w] > hi[i] { hi[i + w] } else { hi[i] };
            nan[i] |= nan[i + w];
        }
        w /= 2;
    }
    (lo[0], hi[0], nan[0] != 0)
}

/// [`min_max_lanes`] with 8 lanes for short groups (a short tree) and 32 for long ones
/// (four independent vector chains, so the loop runs at throughput, not latency).
#[inline(always)]
fn min_max_tree(x: &[f32]) -> (f32, f32, bool) {
    if x.len() >= 128 {
        min_max_lanes::<32>(x)
    } else {
        min_max_lanes::<8>(x)
    }
}

/// Scratch space of the f32 dynamic forward: per group of a block, its min, max and NaN
/// flag, then its reciprocal scale and clamp bounds.
#[derive(Default)]
struct Scratch {
    min: Vec<f32>,
    max: Vec<f32>,
    nan: Vec<bool>,
    inv: Vec<f32>,
    lo: Vec<f32>,
    hi: Vec<f32>,
    in_lo: Vec<f32>,
    in_hi: Vec<f32>,
}

/// [`dynamic_block_f32_masked`] without a mask (the tests' reference).
#[cfg(test)]
fn dynamic_block_f32(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    sc: &mut [f32],
    zp: &mut [f32],
    len: usize,
    r: QRule,
    t: &mut Scratch,
) {
    dynamic_block_f32_masked(x, y, sc, zp, len, r, t, None)
}

/// The f32 dynamic forward of one block of groups: each group's min/max, then all their
/// qparams in one branch-free loop (the divisions of different groups vectorise), then
/// the codes. Gives the bits of [`QRule::qparams`] and [`Step::fake_quant`]. Also writes
/// the straight-through mask when `mask` is given: bit
/// `j` of byte `i` is set when element `8 * i + j`'s unclamped code lies strictly inside
/// the range ([`Step::in_range`]'s bits). With a mask, `len` is a multiple of 8 and `mask`
/// holds `x.len() / 8` bytes.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx512f+avx2", "x86_64+avx2"))]
fn dynamic_block_f32_masked(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    sc: &mut [f32],
    zp: &mut [f32],
    len: usize,
    r: QRule,
    t: &mut Scratch,
    mask: Option<&mut [u8]>,
) {
    let g = x.len() / len;
    for v in [
        &mut t.min,
        &mut t.max,
        &mut t.inv,
        &mut t.lo,
        &mut t.hi,
        &mut t.in_lo,
        &mut t.in_hi,
    ] {
        v.resize(g, 0.0);
    }
    t.nan.resize(g, false);
    for (k, xg) in x.chunks(len).enumerate() {
        let (lo, hi, nan) = min_max_tree(xg);
        t.min[k] = lo;
        t.max[k] = hi;
        t.nan[k] = nan;
    }
    let (qmin, qmax, eps) = (r.qmin, r.qmax, r.eps);
    let floor = |s: f32| if s < eps { eps } else { s };
    let (sc, zp) = (&mut sc[..g], &mut zp[..g]);
    match r.rule {
        Rule::Symmetric { div } => {
            for k in 0..g {
                let (mn, mx) = (t.min[k], t.max[k]);
                let a = if mn < 0.0 { -mn } else { 0.0 };
                let b = if mx > 0.0 { mx } else { 0.0 };
                sc[k] = floor((if a > b { a } else { b }) / div);
                zp[k] = 0.0;
            }
        }
        Rule::Asymmetric => {
            for k in 0..g {
                let lo = if t.min[k] < 0.0 { t.min[k] } else { 0.0 };
                let hi = if t.max[k] > 0.0 { t.max[k] } else { 0.0 };
                let s = floor((hi - lo) / (qmax - qmin));
                // |lo / s| <= qmax - qmin (up to rounding), so the trick rounds exactly.
                let z = qmin - round_small(lo / s);
                let z = if z < qmin { qmin } else { z };
                sc[k] = s;
                zp[k] = if z > qmax { qmax } else { z };
            }
        }
        Rule::Tinygemm { levels, mid } => {
            for k in 0..g {
                let s = floor((t.max[k] - t.min[k]) / levels);
                sc[k] = s;
                zp[k] = (t.min[k] + s * mid).trunc();
            }
        }
    }
    for k in 0..g {
        if t.nan[k] {
            sc[k] = f32::NAN;
            zp[k] = f32::NAN;
        }
        let z = zp[k];
        let z = if z < -MAX_ZERO_POINT {
            -MAX_ZERO_POINT
        } else {
            z
        };
        let z = if z > MAX_ZERO_POINT {
            MAX_ZERO_POINT
        } else {
            z
        };
        t.inv[k] = 1.0 / sc[k];
        t.lo[k] = qmin - z;
        t.hi[k] = qmax - z;
    }
    if let Some(m) = mask {
        assert!(
            len.is_multiple_of(8) && m.len() * 8 == x.len(),
            "intx kernel: mask size"
        );
        for k in 0..g {
            (t.in_lo[k], t.in_hi[k]) = strict_bounds(t.lo[k], t.hi[k]);
        }
        #[cfg(target_arch = "x86_64")]
        {
            let b = super::intx_avx2::GroupBounds {
                inv: &t.inv,
                lo: &t.lo,
                hi: &t.hi,
                scale: sc,
                in_lo: &t.in_lo,
                in_hi: &t.in_hi,
            };
            if super::intx_avx2::outputs_masked(x, y, m, len, &b) {
                return;
            }
        }
        let groups = x
            .chunks(len)
            .zip(y.chunks_mut(len))
            .zip(m.chunks_mut(len / 8));
        for (k, ((xg, yg), mg)) in groups.enumerate() {
            let (s, inv, lo, hi) = (sc[k], t.inv[k], t.lo[k], t.hi[k]);
            let (il, ih) = (t.in_lo[k], t.in_hi[k]);
            let eights = xg.as_chunks::<8>().0.iter().zip(yg.as_chunks_mut::<8>().0);
            for ((xc, yc), b) in eights.zip(mg) {
                let mut bits = 0u8;
                for j in 0..8 {
                    let c = xc[j] * inv;
                    bits |= (((c >= il) & (c <= ih)) as u8) << j;
                    let c = if c < lo { lo } else { c };
                    yc[j].write(round_small(if c > hi { hi } else { c }) * s);
                }
                *b = bits;
            }
        }
        return;
    }
    for (k, (xg, yg)) in x.chunks(len).zip(y.chunks_mut(len)).enumerate() {
        let (s, inv, lo, hi) = (sc[k], t.inv[k], t.lo[k], t.hi[k]);
        for (o, &v) in yg.iter_mut().zip(xg) {
            let c = v * inv;
            let c = if c < lo { lo } else { c };
            o.write(round_small(if c > hi { hi } else { c }) * s);
        }
    }
}

/// The f32 straight-through backward of a block of groups with the given qparams.
#[multiversion(targets("x86_64+avx2"))]
fn backward_block_f32(
    x: &[f32],
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
    sc: &[f32],
    zp: &[f32],
    len: usize,
    (qmin, qmax): (f32, f32),
) {
    for (k, ((xg, dg), og)) in x
        .chunks(len)
        .zip(dy.chunks(len))
        .zip(dx.chunks_mut(len))
        .enumerate()
    {
        let (s, z) = (sc[k], zp[k].clamp(-MAX_ZERO_POINT, MAX_ZERO_POINT));
        let inv = 1.0 / s;
        let (in_lo, in_hi) = strict_bounds(qmin - z, qmax - z);
        for ((o, &v), &d) in og.iter_mut().zip(xg).zip(dg) {
            let t = v * inv;
            o.write(if t >= in_lo && t <= in_hi {
                (d * s) * inv
            } else {
                0.0
            });
        }
    }
}

/// One group's grid: the code relative to the zero point is clamped to `[lo, hi]` =
/// `[qmin - zp, qmax - zp]`; `in_lo..=in_hi` are the `t` whose code is strictly inside the
/// range (the straight-through mask).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Step {
    pub scale: f32,
    pub inv: f32,
    pub zero_point: f32,
    pub lo: f32,
    pub hi: f32,
    in_lo: f32,
    in_hi: f32,
}

impl Step {
    /// The grid of `(scale, zp)` over `qmin..=qmax`; `zp` is an integer with |zp| <=
    /// [`MAX_ZERO_POINT`] or NaN (checked by the callers).
    pub fn new(scale: f32, zero_point: f32, qmin: f32, qmax: f32) -> Self {
        let (lo, hi) = (qmin - zero_point, qmax - zero_point);
        let (in_lo, in_hi) = strict_bounds(lo, hi);
        Step {
            scale,
            inv: 1.0 / scale,
            zero_point,
            lo,
            hi,
            in_lo,
            in_hi,
        }
    }

    /// `round_half_even(clamp(t, lo, hi))`: the clamped code relative to the zero point
    /// (clamping first gives the same code, as the bounds are integers, and keeps the
    /// rounding exact).
    #[inline(always)]
    fn code(&self, x: f32) -> f32 {
        let t = x * self.inv;
        let t = if t < self.lo { self.lo } else { t };
        round_small(if t > self.hi { self.hi } else { t })
    }

    /// The f32 forward of one element.
    #[inline(always)]
    pub fn fake_quant(&self, x: f32) -> f32 {
        self.code(x) * self.scale
    }

    /// Whether the unclamped code is strictly inside the range (false for NaN).
    #[inline(always)]
    pub fn in_range(&self, x: f32) -> bool {
        let t = x * self.inv;
        t >= self.in_lo && t <= self.in_hi
    }

    /// The forward of one element of an f16/bf16 tensor (given as f32): `(q - zp)` and
    /// the product with the f32 scale are rounded to the format, as in PyTorch.
    #[inline(always)]
    fn fake_quant_narrow(&self, x: f32, n: Narrow) -> f32 {
        let q = self.code(x) + self.zero_point;
        n.round(n.round(q - n.round(self.zero_point)) * self.scale)
    }
}

/// `y = fake_quant(x)` over groups of `len`, group `k` with `steps[k]` (f32).
#[multiversion(targets("x86_64+avx2"))]
fn forward_block(x: &[f32], y: &mut [MaybeUninit<f32>], steps: &[Step], len: usize) {
    for ((xg, yg), s) in x.chunks(len).zip(y.chunks_mut(len)).zip(steps) {
        for (o, &v) in yg.iter_mut().zip(xg) {
            o.write(s.fake_quant(v));
        }
    }
}

/// `dx = in_range ? (dy * scale) * (1/scale) : 0` over groups of `len` (f32).
#[multiversion(targets("x86_64+avx2"))]
fn backward_block(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], steps: &[Step], len: usize) {
    for (((xg, dg), og), s) in x
        .chunks(len)
        .zip(dy.chunks(len))
        .zip(dx.chunks_mut(len))
        .zip(steps)
    {
        for ((o, &v), &d) in og.iter_mut().zip(xg).zip(dg) {
            o.write(if s.in_range(v) {
                (d * s.scale) * s.inv
            } else {
                0.0
            });
        }
    }
}

fn forward_block_any(x: &[f32], y: &mut [MaybeUninit<f32>], steps: &[Step], len: usize, n: Narrow) {
    if n == Narrow::F32 {
        return forward_block(x, y, steps, len);
    }
    for ((xg, yg), s) in x.chunks(len).zip(y.chunks_mut(len)).zip(steps) {
        for (o, &v) in yg.iter_mut().zip(xg) {
            o.write(s.fake_quant_narrow(v, n));
        }
    }
}

fn backward_block_any(
    x: &[f32],
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
    steps: &[Step],
    len: usize,
    n: Narrow,
) {
    if n == Narrow::F32 {
        return backward_block(x, dy, dx, steps, len);
    }
    for (((xg, dg), og), s) in x
        .chunks(len)
        .zip(dy.chunks(len))
        .zip(dx.chunks_mut(len))
        .zip(steps)
    {
        for ((o, &v), &d) in og.iter_mut().zip(xg).zip(dg) {
            o.write(if s.in_range(v) {
                n.round(n.round(d * s.scale) * s.inv)
            } else {
                0.0
            });
        }
    }
}

/// Groups handled together: their min/max, then their qparams (independent divisions,
/// which pipeline), then their outputs — about 4096 elements, so the block is still in L1
/// for the second read.
fn groups_per_block(len: usize) -> usize {
    (4096 / len.max(1)).max(1)
}

/// Per-group scales and zero points (f32, integer-valued zero points).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct GroupParams {
    pub scale: Vec<f32>,
    pub zero_point: Vec<f32>,
}

impl GroupParams {
    fn step(&self, g: usize, qmin: f32, qmax: f32) -> Step {
        Step::new(self.scale[g], self.zero_point[g], qmin, qmax)
    }

    /// The first zero point the kernels cannot take exactly, if any.
    pub fn oversized_zero_point(&self) -> Option<f32> {
        // A branch-free scan first (it vectorises; a `find` runs one element per branch),
        // then the first offender only when there is one.
        let any = self
            .zero_point
            .iter()
            .fold(false, |a, z| a | (z.abs() > MAX_ZERO_POINT));
        if !any {
            return None;
        }
        self.zero_point
            .iter()
            .copied()
            .find(|z| z.abs() > MAX_ZERO_POINT)
    }
}

/// Groups per parallel task: about [`CHUNK`] elements, whole groups.
fn groups_per_task(len: usize) -> usize {
    (CHUNK / len.max(1)).max(1)
}

/// Runs `f(first_group, x_part, out_part)` over tasks of whole groups, in parallel when
/// the data is large; returns the filled output.
fn over_groups<F>(x: &[f32], len: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &[f32], &mut [MaybeUninit<f32>]) + Sync,
{
    let n = x.len();
    let per = groups_per_task(len) * len;
    assert_eq!(n % len.max(1), 0, "intx kernel: input of whole groups");
    // SAFETY: `out` has `n` elements and is handed to `f` whole or in chunks paired with
    // the input chunks of the same length; every `f` of this file writes one output per
    // input element of its part (the group kernels map each element of a group to its
    // fake-quantized value), so every element is written.
    unsafe {
        alloc_with(n, |out| {
            if n < 2 * CHUNK {
                f(0, x, out);
            } else {
                out.par_chunks_mut(per)
                    .zip(x.par_chunks(per))
                    .enumerate()
                    .for_each(|(i, (o, xs))| f(i * per / len, xs, o));
            }
        })
    }
}

/// The dynamic forward: each group's qparams from its own min/max, then its outputs.
/// `x.len()` is a multiple of `len`.
pub(crate) fn forward_dynamic(x: &[f32], len: usize, r: QRule) -> (Vec<f32>, GroupParams) {
    let (y, p, _) = forward_dynamic_impl(x, len, r, false);
    (y, p)
}

/// Whether the dynamic forward can write a straight-through mask for groups of `len` in
/// this format: f32 data, groups of whole bytes of mask.
pub(crate) fn can_mask(len: usize, narrow: Narrow) -> bool {
    narrow == Narrow::F32 && len > 0 && len.is_multiple_of(8)
}

/// [`forward_dynamic`], also returning the straight-through mask (see
/// [`dynamic_block_f32_masked`]) where [`can_mask`] allows it, for
/// [`backward_masked`].
pub(crate) fn forward_dynamic_masked(
    x: &[f32],
    len: usize,
    r: QRule,
) -> (Vec<f32>, GroupParams, Option<Vec<u8>>) {
    forward_dynamic_impl(x, len, r, can_mask(len, r.narrow))
}

fn forward_dynamic_impl(
    x: &[f32],
    len: usize,
    r: QRule,
    with_mask: bool,
) -> (Vec<f32>, GroupParams, Option<Vec<u8>>) {
    let len = len.max(1);
    let with_mask = with_mask && can_mask(len, r.narrow);
    let groups = x.len() / len;
    let mut params = GroupParams {
        scale: vec![0.0; groups],
        zero_point: vec![0.0; groups],
    };
    let per = groups_per_task(len);
    let run = |xs: &[f32],
               o: &mut [MaybeUninit<f32>],
               sc: &mut [f32],
               zp: &mut [f32],
               mut mask: Option<&mut [u8]>| {
        let b = groups_per_block(len);
        let mut mm = Vec::with_capacity(b);
        let mut steps = Vec::with_capacity(b);
        let mut scratch = Scratch::default();
        // With a mask, each block's bytes (`len` is a multiple of 8 then).
        let mut masks = mask.as_deref_mut().map(|m| m.chunks_mut(b * len / 8));
        for (((xb, ob), sb), zb) in xs
            .chunks(b * len)
            .zip(o.chunks_mut(b * len))
            .zip(sc.chunks_mut(b))
            .zip(zp.chunks_mut(b))
        {
            let mb = masks.as_mut().and_then(|it| it.next());
            if r.narrow == Narrow::F32 {
                let mut mb = mb;
                // Groups of 32: the explicit AVX2 kernel takes whole steps of 8 groups
                // where the CPU has it, the portable one the rest.
                #[cfg(target_arch = "x86_64")]
                let done = if len == super::intx_avx2::GROUP {
                    let mut portable =
                        |x: &[f32],
                         y: &mut [MaybeUninit<f32>],
                         s: &mut [f32],
                         z: &mut [f32],
                         m: Option<&mut [u8]>| {
                            dynamic_block_f32_masked(x, y, s, z, len, r, &mut scratch, m)
                        };
                    let m = mb.as_deref_mut();
                    super::intx_avx2::dynamic_g32_masked(xb, ob, sb, zb, r, &mut portable, m)
                } else {
                    0
                };
                #[cfg(not(target_arch = "x86_64"))]
                let done = 0;
                if done < sb.len() {
                    let (xr, or) = (&xb[done * len..], &mut ob[done * len..]);
                    let mr = mb.map(|m| &mut m[done * len / 8..]);
                    dynamic_block_f32_masked(
                        xr,
                        or,
                        &mut sb[done..],
                        &mut zb[done..],
                        len,
                        r,
                        &mut scratch,
                        mr,
                    );
                }
                continue;
            }
            min_max_block(xb, len, &mut mm);
            steps.clear();
            for (k, &(lo, hi, nan)) in mm.iter().enumerate() {
                let (s, z) = r.qparams(lo, hi, nan);
                sb[k] = s;
                zb[k] = z;
                // An oversized zero point is reported by the caller before the output is
                // used; its group is computed with the zero point clamped into range.
                let zc = z.clamp(-MAX_ZERO_POINT, MAX_ZERO_POINT);
                steps.push(Step::new(s, zc, r.qmin, r.qmax));
            }
            forward_block_any(xb, ob, &steps, len, r.narrow);
        }
    };
    let n = x.len();
    assert_eq!(n, groups * len, "intx kernel: input of whole groups");
    // Every byte is written by the masked kernels (one bit per element, `len` a multiple
    // of 8); zeroed anyway, as a vector of bytes costs little to clear.
    let mut mask = with_mask.then(|| vec![0u8; n / 8]);
    // SAFETY: `run` splits its output part into blocks paired with input blocks of the same
    // length and both block kernels write one output per input element; the parts handed to
    // `run` cover `out` (`n` is a whole number of groups, asserted above), so every element
    // is written.
    let y = unsafe {
        alloc_with(n, |out| {
            if n < 2 * CHUNK {
                run(
                    x,
                    out,
                    &mut params.scale,
                    &mut params.zero_point,
                    mask.as_deref_mut(),
                );
            } else if let Some(m) = mask.as_deref_mut() {
                // `per * len` is a multiple of 8 (`len` is, with a mask): the tasks' mask
                // bytes pair with their elements.
                out.par_chunks_mut(per * len)
                    .zip(x.par_chunks(per * len))
                    .zip(params.scale.par_chunks_mut(per))
                    .zip(params.zero_point.par_chunks_mut(per))
                    .zip(m.par_chunks_mut(per * len / 8))
                    .for_each(|((((o, xs), sc), zp), m)| run(xs, o, sc, zp, Some(m)));
            } else {
                out.par_chunks_mut(per * len)
                    .zip(x.par_chunks(per * len))
                    .zip(params.scale.par_chunks_mut(per))
                    .zip(params.zero_point.par_chunks_mut(per))
                    .for_each(|(((o, xs), sc), zp)| run(xs, o, sc, zp, None));
            }
        })
    };
    (y, params, mask)
}

/// The straight-through backward from the forward's mask (see
/// [`dynamic_block_f32_masked`]) and scales: `dx = bit ? (dy * scale) * (1/scale) : 0`,
/// the bits of [`backward`] without reading the input. `dy.len()` is a whole number of
/// groups of `len` (a multiple of 8), `mask` holds `dy.len() / 8` bytes and `scale` one
/// per group (asserted).
pub(crate) fn backward_masked(dy: &[f32], mask: &[u8], len: usize, scale: &[f32]) -> Vec<f32> {
    assert!(
        len > 0
            && len.is_multiple_of(8)
            && dy.len().is_multiple_of(len)
            && mask.len() * 8 == dy.len()
            && scale.len() * len == dy.len(),
        "intx kernel: masked backward sizes"
    );
    over_groups(dy, len, |g0, ds, o| {
        let g = ds.len() / len;
        let (m, sc) = (&mask[g0 * len / 8..(g0 + g) * len / 8], &scale[g0..g0 + g]);
        #[cfg(target_arch = "x86_64")]
        if super::intx_avx2::backward_masked(ds, m, o, sc, len) {
            return;
        }
        backward_masked_block(ds, m, o, sc, len)
    })
}

/// [`backward_masked`] of one task's groups.
#[multiversion(targets("x86_64+avx512f+avx2", "x86_64+avx2"))]
fn backward_masked_block(
    dy: &[f32],
    mask: &[u8],
    dx: &mut [MaybeUninit<f32>],
    sc: &[f32],
    len: usize,
) {
    let groups = dy
        .chunks(len)
        .zip(mask.chunks(len / 8))
        .zip(dx.chunks_mut(len));
    for (((dg, mg), og), &s) in groups.zip(sc) {
        let inv = 1.0 / s;
        let eights = dg.as_chunks::<8>().0.iter().zip(og.as_chunks_mut::<8>().0);
        for ((dc, oc), &b) in eights.zip(mg) {
            for j in 0..8 {
                let on = (b >> j) & 1 != 0;
                oc[j].write(if on { (dc[j] * s) * inv } else { 0.0 });
            }
        }
    }
}

/// Only the qparams of every group (for static quantizers and range-learning init).
pub(crate) fn qparams_only(x: &[f32], len: usize, r: QRule) -> GroupParams {
    let len = len.max(1);
    let per = groups_per_task(len) * len;
    let (scale, zero_point) = x
        .par_chunks(per)
        .flat_map_iter(|xs| {
            xs.chunks(len).map(|g| {
                let (lo, hi, nan) = min_max(g);
                r.qparams(lo, hi, nan)
            })
        })
        .unzip();
    GroupParams { scale, zero_point }
}

/// Runs `f(steps, x_block, out_block, first_element)` over blocks of whole groups with the
/// steps of `p`, in parallel tasks when the data is large.
fn with_steps<F>(x: &[f32], len: usize, p: &GroupParams, qmin: f32, qmax: f32, f: F) -> Vec<f32>
where
    F: Fn(&[Step], &[f32], &mut [MaybeUninit<f32>], usize) + Sync,
{
    let len = len.max(1);
    let b = groups_per_block(len);
    over_groups(x, len, |g0, xs, o| {
        let mut steps = Vec::with_capacity(b);
        for (i, (xb, ob)) in xs.chunks(b * len).zip(o.chunks_mut(b * len)).enumerate() {
            let first = g0 + i * b;
            steps.clear();
            steps.extend((first..first + xb.len() / len).map(|g| p.step(g, qmin, qmax)));
            f(&steps, xb, ob, first * len);
        }
    })
}

/// The forward with given qparams (static quantizers).
pub(crate) fn forward_static(
    x: &[f32],
    len: usize,
    p: &GroupParams,
    qmin: f32,
    qmax: f32,
    narrow: Narrow,
) -> Vec<f32> {
    with_steps(x, len, p, qmin, qmax, |steps, xb, ob, _| {
        forward_block_any(xb, ob, steps, len.max(1), narrow)
    })
}

/// The straight-through backward with the forward's qparams.
pub(crate) fn backward(
    x: &[f32],
    dy: &[f32],
    len: usize,
    p: &GroupParams,
    qmin: f32,
    qmax: f32,
    narrow: Narrow,
) -> Vec<f32> {
    let len = len.max(1);
    if narrow == Narrow::F32 {
        return over_groups(x, len, |g0, xs, o| {
            let (off, g) = (g0 * len, xs.len() / len);
            let (sc, zp) = (&p.scale[g0..g0 + g], &p.zero_point[g0..g0 + g]);
            let dy = &dy[off..off + xs.len()];
            // Groups of 32: the explicit AVX2 kernel takes whole steps of 8 groups where
            // the CPU has it, the portable one the rest.
            #[cfg(target_arch = "x86_64")]
            let done = if len == super::intx_avx2::GROUP {
                super::intx_avx2::backward_g32(xs, dy, o, sc, zp, (qmin, qmax))
            } else {
                0
            };
            #[cfg(not(target_arch = "x86_64"))]
            let done = 0;
            let (r, e) = (done * len, xs.len());
            let (sc, zp) = (&sc[done..], &zp[done..]);
            backward_block_f32(&xs[r..], &dy[r..e], &mut o[r..], sc, zp, len, (qmin, qmax))
        });
    }
    with_steps(x, len, p, qmin, qmax, |steps, xb, ob, off| {
        backward_block_any(xb, &dy[off..off + xb.len()], ob, steps, len, narrow)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
        // SAFETY: every test fills the whole vector before reading it.
        v.into_iter().map(|m| unsafe { m.assume_init() }).collect()
    }

    #[test]
    fn strict_mask_matches_the_code_bitwise() {
        for (scale, zp, qmin, qmax) in [
            (0.1f32, 3.0f32, -8.0f32, 7.0f32),
            (0.25, 0.0, -128.0, 127.0),
            (1.0, -7.0, -8.0, 7.0),
            (0.5, 0.0, -2.0, 1.0),
            (1.0, 0.0, -1.0, 0.0),
        ] {
            let s = Step::new(scale, zp, qmin, qmax);
            let mut ts: Vec<f32> = (-3000..3000).map(|i| i as f32 * 0.0625).collect();
            for b in [s.lo, s.hi] {
                for k in -8..=8 {
                    let t = b + k as f32 * 0.25;
                    ts.extend([t, t.next_up(), t.next_down()]);
                }
            }
            ts.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0]);
            for t in ts {
                let x = t * scale;
                let q = (x * s.inv).round_ties_even() + zp;
                assert_eq!(s.in_range(x), q > qmin && q < qmax, "t {t}, {s:?}");
                let want = (q.clamp(qmin, qmax) - zp) * scale;
                if !q.is_nan() {
                    assert_eq!(s.fake_quant(x), want, "t {t}, {s:?}");
                }
            }
        }
    }

    #[test]
    fn nan_groups_give_nan_qparams_and_outputs_in_every_path() {
        for rule in [
            Rule::Symmetric { div: 7.5 },
            Rule::Asymmetric,
            Rule::Tinygemm {
                levels: 15.0,
                mid: 8.0,
            },
        ] {
            let r = QRule {
                rule,
                qmin: -8.0,
                qmax: 7.0,
                eps: 1e-6,
                narrow: Narrow::F32,
            };
            for len in [8usize, 200] {
                let mut x: Vec<f32> = (0..3 * len).map(|i| i as f32 * 0.01 - 1.0).collect();
                x[len + 3] = f32::NAN;
                let (y, p) = forward_dynamic(&x, len, r);
                let q = qparams_only(&x, len, r);
                let b = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(b(&p.scale), b(&q.scale), "{rule:?}");
                assert_eq!(b(&p.zero_point), b(&q.zero_point), "{rule:?}");
                assert!(p.scale[1].is_nan() && p.zero_point[1].is_nan());
                assert!(y[len..2 * len].iter().all(|v| v.is_nan()), "{rule:?}");
                assert!(y[..len].iter().chain(&y[2 * len..]).all(|v| !v.is_nan()));
            }
        }
    }

    /// The AVX2 g32 kernels (through `forward_dynamic` and `backward`, which also run the
    /// portable kernels on the groups after the last whole step of 8) give the portable
    /// kernels' bits for every rule: random groups at several magnitudes, all-negative,
    /// all-positive and all-zero groups, zero-only extremes, NaN and infinite groups, scale
    /// floors; the backward also with odd qparams (NaN/zero scales, oversized zero points).
    #[test]
    fn g32_forward_and_backward_match_the_portable_kernels_bitwise() {
        let mut s: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut x = Vec::new();
        for scale in [1.0f32, 1e-3, 3.0e4, 1e-38, 1e-44, 1e30, 1e-7] {
            for _ in 0..40 {
                let mut g: Vec<f32> = (0..32)
                    .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
                    .collect();
                match next() % 8 {
                    0 => g.iter_mut().for_each(|v| *v = -v.abs()),
                    1 => g.iter_mut().for_each(|v| *v = v.abs()),
                    2 => g
                        .iter_mut()
                        .for_each(|v| *v = ((*v / scale) * 8.0).round() * scale / 8.0),
                    3 => g[(next() % 32) as usize] = if next() % 2 == 0 { 0.0 } else { -0.0 },
                    _ => {}
                }
                x.extend(g);
            }
        }
        let mut special = vec![0.0f32; 32];
        x.extend(&special);
        special[3] = -0.0;
        x.extend(&special);
        special[9] = f32::NAN;
        x.extend(&special);
        special[9] = f32::INFINITY;
        x.extend(&special);
        special[2] = f32::NEG_INFINITY;
        x.extend(&special);
        x.extend([-0.0f32; 32]);
        // Not a whole number of steps of 8: the last groups take the portable kernel.
        x.extend((0..3 * 32).map(|i| i as f32 - 40.0));
        let rules = [
            (Rule::Symmetric { div: 7.5 }, -8.0, 7.0),
            (Rule::Symmetric { div: 127.5 }, -128.0, 127.0),
            // Symmetric scales on a range the codes fall below (the lower clamp acts).
            (Rule::Symmetric { div: 7.5 }, 0.0, 15.0),
            (Rule::Symmetric { div: 7.0 }, -7.0, 7.0),
            (Rule::Asymmetric, -8.0, 7.0),
            (Rule::Asymmetric, 0.0, 15.0),
            (
                Rule::Tinygemm {
                    levels: 15.0,
                    mid: 8.0,
                },
                0.0,
                15.0,
            ),
        ];
        for (rule, qmin, qmax) in rules {
            for eps in [f32::EPSILON, 0.0, 1e-3] {
                let r = QRule {
                    rule,
                    qmin,
                    qmax,
                    eps,
                    narrow: Narrow::F32,
                };
                let (y, p) = forward_dynamic(&x, 32, r);
                let g = x.len() / 32;
                let (mut sc, mut zp) = (vec![0f32; g], vec![0f32; g]);
                let mut o = vec![MaybeUninit::uninit(); x.len()];
                dynamic_block_f32(&x, &mut o, &mut sc, &mut zp, 32, r, &mut Scratch::default());
                let b = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(b(&p.scale), b(&sc), "{rule:?} eps {eps}");
                assert_eq!(b(&p.zero_point), b(&zp), "{rule:?} eps {eps}");
                let (got, want) = (b(&y), b(&init(o)));
                for i in 0..x.len() {
                    assert_eq!(
                        got[i], want[i],
                        "{rule:?} eps {eps}: element {i} = {:e}",
                        x[i]
                    );
                }
                // The masked kernels: the same outputs and qparams, the reference's bits.
                let (ym, pm, m) = forward_dynamic_masked(&x, 32, r);
                let m = m.expect("f32 groups of 32 get a mask");
                assert_eq!(b(&ym), got, "masked {rule:?} eps {eps}");
                assert_eq!(b(&pm.scale), b(&sc), "masked {rule:?} eps {eps}");
                assert_eq!(b(&pm.zero_point), b(&zp), "masked {rule:?} eps {eps}");
                for (i, &v) in x.iter().enumerate() {
                    let bit = (m[i / 8] >> (i % 8)) & 1 != 0;
                    let st = p.step(i / 32, qmin, qmax);
                    let want = st.in_range(v) && !st.zero_point.is_nan();
                    assert_eq!(bit, want, "mask {rule:?} eps {eps}: element {i} = {v:e}");
                }
                // The backward with these qparams and with others: integral zero points
                // beyond the range and past MAX_ZERO_POINT, NaN and zero scales.
                let mut p2 = p.clone();
                for (k, (s, z)) in p2.scale.iter_mut().zip(&mut p2.zero_point).enumerate() {
                    *z = [0.0, -3.0, 7.0, 300.0, -4e6, 4e6, f32::NAN, 16.0][k % 8];
                    *s = [*s, 0.0, f32::NAN, 0.37, *s, *s, 1e-30, 2.5][(k / 8) % 8];
                }
                let dy: Vec<f32> = (0..x.len()).map(|i| (i % 17) as f32 * 0.3 - 2.0).collect();
                for q in [&p, &p2] {
                    let dx = backward(&x, &dy, 32, q, qmin, qmax, Narrow::F32);
                    let mut o = vec![MaybeUninit::uninit(); x.len()];
                    let lim = (qmin, qmax);
                    backward_block_f32(&x, &dy, &mut o, &q.scale, &q.zero_point, 32, lim);
                    let (got, want) = (b(&dx), b(&init(o)));
                    for i in 0..x.len() {
                        assert_eq!(got[i], want[i], "backward {rule:?} eps {eps}: element {i}");
                    }
                }
            }
        }
    }

    /// The masked forward gives the unmasked forward's outputs and qparams, and the
    /// backward from its mask the bits of the backward that recomputes the mask from the
    /// input: groups of 32 (the AVX2/AVX-512 step kernels, NaN steps and the portable
    /// tail), 8, 40 and 1024 (portable forward), every rule, sequential and parallel sizes;
    /// the AVX-512 backward's flat loops for groups of 16, 32 and 64 (with a tail of fewer
    /// than 16 groups) and its group-by-group loop for 48 and 1024.
    #[test]
    fn masked_forward_and_backward_match_the_unmasked_kernels_bitwise() {
        let mut s: u64 = 0x853c_49e6_748f_ea9b;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let rules = [
            (Rule::Symmetric { div: 7.5 }, -8.0, 7.0),
            (Rule::Asymmetric, -128.0, 127.0),
            (Rule::Asymmetric, 0.0, 15.0),
            (
                Rule::Tinygemm {
                    levels: 15.0,
                    mid: 8.0,
                },
                0.0,
                15.0,
            ),
        ];
        let b = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for len in [32usize, 8, 16, 40, 48, 64, 1024] {
            for n_groups in [3usize, 8 * 9 + 3, 2 * CHUNK / len + 5] {
                let n = n_groups * len;
                let mut x: Vec<f32> = (0..n)
                    .map(|i| {
                        let u = (next() >> 40) as f32 / (1u64 << 24) as f32;
                        (u * 2.0 - 1.0 + (i / len % 5) as f32 * 0.5) * [1.0, 1e-3, 3e4][i % 3]
                    })
                    .collect();
                // A NaN group, a group of zeros, codes exactly on the grid and its ties.
                x[len + 1] = f32::NAN;
                x[2 * len..3 * len].fill(0.0);
                if n_groups > 10 {
                    for (j, v) in x[9 * len..10 * len].iter_mut().enumerate() {
                        *v = (j as f32 - 16.0) * 0.25;
                    }
                }
                for (rule, qmin, qmax) in rules {
                    let r = QRule {
                        rule,
                        qmin,
                        qmax,
                        eps: f32::EPSILON,
                        narrow: Narrow::F32,
                    };
                    let (y0, p0) = forward_dynamic(&x, len, r);
                    let (y, p, m) = forward_dynamic_masked(&x, len, r);
                    let m = m.expect("f32 groups of a multiple of 8 get a mask");
                    assert_eq!(b(&y), b(&y0), "{rule:?} len {len}");
                    assert_eq!(b(&p.scale), b(&p0.scale), "{rule:?} len {len}");
                    assert_eq!(b(&p.zero_point), b(&p0.zero_point), "{rule:?} len {len}");
                    for (i, &v) in x.iter().enumerate() {
                        let bit = (m[i / 8] >> (i % 8)) & 1 != 0;
                        let st = p.step(i / len, qmin, qmax);
                        let want = st.in_range(v) && !st.zero_point.is_nan();
                        assert_eq!(bit, want, "{rule:?} len {len}: element {i} = {v:e}");
                    }
                    let dy: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.7 - 4.0).collect();
                    let want = backward(&x, &dy, len, &p, qmin, qmax, Narrow::F32);
                    let got = backward_masked(&dy, &m, len, &p.scale);
                    assert_eq!(b(&got), b(&want), "backward {rule:?} len {len}");
                    // The portable kernel (the explicit ones above where the CPU has them).
                    let mut o = vec![MaybeUninit::uninit(); n];
                    backward_masked_block(&dy, &m, &mut o, &p.scale, len);
                    assert_eq!(
                        b(&init(o)),
                        b(&want),
                        "portable backward {rule:?} len {len}"
                    );
                }
            }
        }
        let r = QRule {
            rule: Rule::Asymmetric,
            qmin: -128.0,
            qmax: 127.0,
            eps: f32::EPSILON,
            narrow: Narrow::F32,
        };
        assert!(forward_dynamic_masked(&[0.0; 12], 12, r).2.is_none());
        let r16 = QRule {
            narrow: Narrow::F16,
            ..r
        };
        assert!(forward_dynamic_masked(&[0.0; 16], 16, r16).2.is_none());
    }

    /// Codes exactly on ties and on the clamp bounds, and one ulp either side: groups whose
    /// min and max make the scale exactly 1 (so `t` is the input), for every rule. The
    /// masked g32 forward (the AVX-512 kernel rounds before it clamps and takes the mask
    /// from the rounded code) gives the portable outputs and qparams, and the mask bits of
    /// [`Step::in_range`]; the backward from that mask the bits of the one from the input.
    #[test]
    fn masked_g32_forward_at_ties_and_bounds_matches_the_reference() {
        // (rule, qmin, qmax, group min, group max): scale (max - min) / levels = 1.
        let cases = [
            (Rule::Symmetric { div: 7.5 }, -8.0, 7.0, -7.5f32, 7.5f32),
            (Rule::Symmetric { div: 127.5 }, -128.0, 127.0, -127.5, 127.5),
            (Rule::Asymmetric, -128.0, 127.0, -100.0, 155.0),
            (Rule::Asymmetric, 0.0, 15.0, -5.0, 10.0),
            (Rule::Asymmetric, -8.0, 7.0, -15.0, 0.0),
            (
                Rule::Tinygemm {
                    levels: 15.0,
                    mid: 8.0,
                },
                0.0,
                15.0,
                -5.0,
                10.0,
            ),
        ];
        let b = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (rule, qmin, qmax, lo, hi) in cases {
            // Every half-integer of [lo, hi] and its neighbours one ulp away (kept inside
            // [lo, hi]), 30 to a group after the group's min and max.
            let mut vals = Vec::new();
            let mut t = lo;
            while t <= hi {
                vals.extend([t, t.next_up().min(hi), t.next_down().max(lo)]);
                t += 0.5;
            }
            let mut x = Vec::new();
            for c in vals.chunks(30) {
                x.extend([lo, hi]);
                x.extend(c);
                x.extend(std::iter::repeat_n(0.0, 30 - c.len()));
            }
            // Whole steps of 8 groups (the explicit kernels), then 3 more (portable tail).
            while !(x.len() / 32).is_multiple_of(8) {
                x.extend_from_within(..32);
            }
            x.extend_from_within(..3 * 32);
            let r = QRule {
                rule,
                qmin,
                qmax,
                eps: f32::EPSILON,
                narrow: Narrow::F32,
            };
            let g = x.len() / 32;
            let (mut sc, mut zp) = (vec![0f32; g], vec![0f32; g]);
            let mut o = vec![MaybeUninit::uninit(); x.len()];
            dynamic_block_f32(&x, &mut o, &mut sc, &mut zp, 32, r, &mut Scratch::default());
            assert!(sc.iter().all(|&s| s == 1.0), "{rule:?}: scale 1");
            let (y, p, m) = forward_dynamic_masked(&x, 32, r);
            let m = m.expect("f32 groups of 32 get a mask");
            assert_eq!(b(&p.scale), b(&sc), "{rule:?}");
            assert_eq!(b(&p.zero_point), b(&zp), "{rule:?}");
            let want = init(o);
            let mut inside = 0;
            for (i, &v) in x.iter().enumerate() {
                assert_eq!(y[i].to_bits(), want[i].to_bits(), "{rule:?}: {v:e}");
                let bit = (m[i / 8] >> (i % 8)) & 1 != 0;
                let st = p.step(i / 32, qmin, qmax);
                assert_eq!(bit, st.in_range(v), "{rule:?}: element {i} = {v:e}");
                inside += bit as usize;
            }
            assert!(
                inside > 0 && inside < x.len(),
                "{rule:?}: both kinds of bits"
            );
            let dy: Vec<f32> = (0..x.len()).map(|i| (i % 13) as f32 * 0.7 - 4.0).collect();
            let want = backward(&x, &dy, 32, &p, qmin, qmax, Narrow::F32);
            let got = backward_masked(&dy, &m, 32, &p.scale);
            assert_eq!(b(&got), b(&want), "backward {rule:?}");
        }
    }

    #[test]
    fn min_max_matches_a_scan() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
        for n in [0usize, 1, 7, 8, 9, 37] {
            let (lo, hi, nan) = min_max(&x[..n]);
            let want_lo = x[..n].iter().copied().fold(f32::INFINITY, f32::min);
            let want_hi = x[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!((lo, hi, nan), (want_lo, want_hi, false));
        }
        let mut y = x.clone();
        y[13] = f32::NAN;
        assert!(min_max(&y).2);
    }

    #[test]
    fn dynamic_static_and_parallel_paths_agree() {
        let r = QRule {
            rule: Rule::Symmetric { div: 7.5 },
            qmin: -8.0,
            qmax: 7.0,
            eps: f32::MIN_POSITIVE,
            narrow: Narrow::F32,
        };
        // Larger than 2 * CHUNK so that the parallel split runs; groups of 40 straddle
        // CHUNK boundaries.
        let n = 40 * 2000;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        let (y, p) = forward_dynamic(&x, 40, r);
        assert_eq!(p, qparams_only(&x, 40, r));
        assert_eq!(y, forward_static(&x, 40, &p, -8.0, 7.0, Narrow::F32));
        for g in [0usize, 819, 1999] {
            let xs = &x[g * 40..(g + 1) * 40];
            let (lo, hi, nan) = min_max(xs);
            let (s, z) = r.qparams(lo, hi, nan);
            assert_eq!((p.scale[g], p.zero_point[g]), (s, z));
            let mut o = vec![MaybeUninit::uninit(); 40];
            forward_block(xs, &mut o, &[Step::new(s, z, -8.0, 7.0)], 40);
            assert_eq!(init(o), y[g * 40..(g + 1) * 40].to_vec());
        }
        let dy: Vec<f32> = (0..n).map(|i| (i % 17) as f32 - 8.0).collect();
        let dx = backward(&x, &dy, 40, &p, -8.0, 7.0, Narrow::F32);
        for i in [0usize, 40 * 819 + 3, n - 1] {
            let s = p.step(i / 40, -8.0, 7.0);
            let want = if s.in_range(x[i]) {
                (dy[i] * s.scale) * s.inv
            } else {
                0.0
            };
            assert_eq!(dx[i], want);
        }
    }
}
