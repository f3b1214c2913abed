//! The CPU kernels of intx fake quantization (torchao's `IntxFakeQuantizer`): per-group
//! qparams, forward and straight-through backward over f32 slices, one group at a time so
//! that a dynamic forward reads its input once (the group's min/max, then its codes, while
//! it is in L1). The f32 inner loops are compiled for baseline x86-64 and AVX2, chosen at
//! run time; f16/bf16 data runs the same arithmetic in f32 with a rounding to the dtype
//! after each step where PyTorch rounds (see [`Narrow`]).
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

/// Min, max and whether a NaN was seen, in f32 lanes so that the loop vectorises (the
/// result is the same as a sequential scan: min and max are exact). NaNs are caught by
/// `v - v`, which is NaN for NaN and infinities; only then is the group scanned again.
#[inline(always)]
#[allow(clippy::eq_op)] // `v - v` is the NaN/infinity test, not 0.
fn min_max_inline(x: &[f32]) -> (f32, f32, bool) {
    const LANES: usize = 8;
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let mut odd = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let v = c[i];
            lo[i] = if v < lo[i] { v } else { lo[i] };
            hi[i] = if v > hi[i] { v } else { hi[i] };
            odd[i] += v - v;
        }
    }
    for (i, &v) in chunks.remainder().iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
        odd[i] += v - v;
    }
    let mut out = (f32::INFINITY, f32::NEG_INFINITY, false);
    let mut any_odd = false;
    for i in 0..LANES {
        out.0 = out.0.min(lo[i]);
        out.1 = out.1.max(hi[i]);
        any_odd |= odd[i].is_nan();
    }
    if any_odd {
        out.2 = x.iter().any(|v| v.is_nan());
    }
    out
}

/// [`min_max_inline`] of one slice.
#[multiversion(targets("x86_64+avx2"))]
pub(crate) fn min_max(x: &[f32]) -> (f32, f32, bool) {
    min_max_inline(x)
}

/// [`min_max_inline`] of each group of `len` of `x`.
#[multiversion(targets("x86_64+avx2"))]
fn min_max_block(x: &[f32], len: usize, out: &mut Vec<(f32, f32, bool)>) {
    out.clear();
    out.extend(x.chunks(len).map(min_max_inline));
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
        // round_half_even(t) >= a  <=>  t >= a - 0.5 when that tie rounds up to a (a even),
        // t > a - 0.5 otherwise; likewise <= b. a = lo + 1, b = hi - 1 (strict mask).
        let (a, b) = (lo + 1.0, hi - 1.0);
        let even = |v: f32| (v as i64) % 2 == 0;
        let (in_lo, in_hi) = if a > b || a.is_nan() {
            (f32::INFINITY, f32::NEG_INFINITY)
        } else {
            (
                if even(a) {
                    a - 0.5
                } else {
                    (a - 0.5).next_up()
                },
                if even(b) {
                    b + 0.5
                } else {
                    (b + 0.5).next_down()
                },
            )
        };
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

/// The dynamic forward: each group's qparams from its own min/max, then its outputs.
/// `x.len()` is a multiple of `len`.
pub(crate) fn forward_dynamic(x: &[f32], len: usize, r: QRule) -> (Vec<f32>, GroupParams) {
    let len = len.max(1);
    let groups = x.len() / len;
    let mut params = GroupParams {
        scale: vec![0.0; groups],
        zero_point: vec![0.0; groups],
    };
    let per = groups_per_task(len);
    let run = |xs: &[f32], o: &mut [MaybeUninit<f32>], sc: &mut [f32], zp: &mut [f32]| {
        let b = groups_per_block(len);
        let mut mm = Vec::with_capacity(b);
        let mut steps = Vec::with_capacity(b);
        for (((xb, ob), sb), zb) in xs
            .chunks(b * len)
            .zip(o.chunks_mut(b * len))
            .zip(sc.chunks_mut(b))
            .zip(zp.chunks_mut(b))
        {
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
    let y = alloc_with(n, |out| {
        if n < 2 * CHUNK {
            run(x, out, &mut params.scale, &mut params.zero_point);
        } else {
            out.par_chunks_mut(per * len)
                .zip(x.par_chunks(per * len))
                .zip(params.scale.par_chunks_mut(per))
                .zip(params.zero_point.par_chunks_mut(per))
                .for_each(|(((o, xs), sc), zp)| run(xs, o, sc, zp));
        }
    });
    (y, params)
}

/// Only the qparams of every group (for static quantizers and range-learning init).
pub(crate) fn qparams_only(x: &[f32], len: usize, r: QRule) -> GroupParams {
    let (scale, zero_point) = x
        .par_chunks(len.max(1))
        .map(|g| {
            let (lo, hi, nan) = min_max(g);
            r.qparams(lo, hi, nan)
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
    with_steps(x, len, p, qmin, qmax, |steps, xb, ob, off| {
        backward_block_any(xb, &dy[off..off + xb.len()], ob, steps, len.max(1), narrow)
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
