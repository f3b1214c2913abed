//! The AVX2 dynamic forward of intx fake quantization for groups of 32 f32s (torchao's
//! int4 per-group g32 and any other g32 spec), bit-exact with
//! [`super::intx_kernel`]'s portable `dynamic_block_f32`, which stays the reference.
//!
//! Groups go 8 at a time: each group's 32 values are 4 AVX registers; their minima,
//! maxima and NaN flags (symmetric rules: their largest |x|, NaN included, in one integer
//! reduction) are reduced to one lane per group (an 8x8 transpose), the 8 scales and zero
//! points computed lane-wise with the portable kernel's selects, in its order (no FMA
//! contraction), then each group (still in L1) is quantized from broadcasts. The qparams of
//! the next step are computed before the outputs of the current one (software pipelining:
//! the divisions' latency hides behind independent work). Where the CPU has AVX-512F the
//! output loop runs the same operations 16 lanes at a time. Steps holding a NaN take the
//! portable kernel (which gives NaN qparams and outputs to a NaN group); the sign of a
//! zero minimum or maximum is not kept, which no qparams rule distinguishes.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::intx_kernel::{Narrow, QRule, Rule, MAX_ZERO_POINT};
use super::kernel::MAGIC;
use crate::x86_lanes::reduce8x2;

/// Elements per group this kernel takes.
pub(crate) const GROUP: usize = 32;
/// Groups per step.
const LANES: usize = 8;

/// The dynamic forward of the first `8 * k` groups of 32 (`k` as large as `x` allows):
/// outputs, scales and zero points; returns how many groups it did (0 without AVX2, or for
/// data that is not f32). Steps of 8 groups holding a NaN go to `portable`. `x.len() ==
/// y.len()`, `sc` and `zp` one per group of `x`. Also writes the straight-through mask of
/// the groups it does when `mask` is given (`x.len() / 8` bytes; bit `j` of byte `i` set when element `8 * i + j`'s
/// unclamped code is strictly inside the range, the portable `dynamic_block_f32_masked`'s
/// bits). `portable` gets the mask bytes of its groups.
pub(crate) fn dynamic_g32_masked(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    sc: &mut [f32],
    zp: &mut [f32],
    r: QRule,
    portable: PortableMasked<'_>,
    mask: Option<&mut [u8]>,
) -> usize {
    dispatch(x, y, sc, zp, r, portable, mask, true)
}

/// [`dynamic_g32_masked`] without a mask, with the AVX-512 output loop where the CPU has
/// AVX-512F and `wide` (tests run both).
#[cfg(test)]
fn dynamic_g32_at(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    sc: &mut [f32],
    zp: &mut [f32],
    r: QRule,
    portable: Portable<'_>,
    wide: bool,
) -> usize {
    let mut adapt = |x: &[f32],
                     y: &mut [MaybeUninit<f32>],
                     s: &mut [f32],
                     z: &mut [f32],
                     _: Option<&mut [u8]>| { portable(x, y, s, z) };
    dispatch(x, y, sc, zp, r, &mut adapt, None, wide)
}

/// [`dynamic_g32_masked`], with the AVX-512 output loop where the CPU has AVX-512F and
/// `wide`.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    sc: &mut [f32],
    zp: &mut [f32],
    r: QRule,
    portable: PortableMasked<'_>,
    mask: Option<&mut [u8]>,
    wide: bool,
) -> usize {
    if r.narrow != Narrow::F32 || !is_x86_feature_detected!("avx2") {
        return 0;
    }
    let sym = symmetric_floor_idle(r);
    match (wide && is_x86_feature_detected!("avx512f"), mask) {
        // SAFETY: AVX2 and AVX-512F were detected on this CPU just above.
        (true, Some(m)) if sym => unsafe { run512::<true, true>(x, y, sc, zp, r, portable, m) },
        // SAFETY: as above.
        (true, Some(m)) => unsafe { run512::<true, false>(x, y, sc, zp, r, portable, m) },
        // SAFETY: as above.
        (true, None) if sym => unsafe { run512::<false, true>(x, y, sc, zp, r, portable, &mut []) },
        // SAFETY: as above.
        (true, None) => unsafe { run512::<false, false>(x, y, sc, zp, r, portable, &mut []) },
        // SAFETY: AVX2 was detected on this CPU just above.
        (false, Some(m)) => unsafe { run::<true>(x, y, sc, zp, r, portable, m) },
        // SAFETY: as above.
        (false, None) => unsafe { run::<false>(x, y, sc, zp, r, portable, &mut []) },
    }
}

#[cfg(test)]
/// The portable dynamic forward of some groups (inputs, outputs, scales, zero points),
/// which [`dynamic_g32_masked`] runs on each step of 8 groups holding a NaN.
pub(crate) type Portable<'a> =
    &'a mut dyn FnMut(&[f32], &mut [MaybeUninit<f32>], &mut [f32], &mut [f32]);

/// [`Portable`] with the mask bytes of its groups, when there is a mask.
pub(crate) type PortableMasked<'a> =
    &'a mut dyn FnMut(&[f32], &mut [MaybeUninit<f32>], &mut [f32], &mut [f32], Option<&mut [u8]>);

/// Mask bytes per step (one bit per element).
const STEP_BYTES: usize = LANES * GROUP / 8;

/// With `M`, `mask` holds `x.len() / 8` bytes (asserted) and gets the steps' masks;
/// without, it is not used.
#[target_feature(enable = "avx2")]
fn run<const M: bool>(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    sc: &mut [f32],
    zp: &mut [f32],
    r: QRule,
    portable: PortableMasked<'_>,
    mask: &mut [u8],
) -> usize {
    let n = x.len() / (LANES * GROUP);
    assert!(y.len() == x.len() && sc.len() >= n * LANES && zp.len() >= n * LANES);
    assert!(!M || mask.len() * 8 == x.len());
    let mut ms = mask.as_chunks_mut::<STEP_BYTES>().0.iter_mut();
    let mut none = [0u8; STEP_BYTES];
    let xs = x.as_chunks::<{ LANES * GROUP }>().0;
    let ys = y.as_chunks_mut::<{ LANES * GROUP }>().0;
    let scs = sc.as_chunks_mut::<LANES>().0;
    let zps = zp.as_chunks_mut::<LANES>().0;
    // Software-pipelined: the qparams of step k + 1 (a reduction, then two dependent
    // divisions) are computed before the outputs of step k, so that their latency
    // overlaps independent work instead of stalling every step.
    let mut next = xs.first().map(|x0| qparams(x0, r));
    for (k, (((xg, yg), s), z)) in xs.iter().zip(ys).zip(scs).zip(zps).enumerate() {
        let cur = next;
        next = xs.get(k + 1).map(|x1| qparams(x1, r));
        // With `M` every step has its bytes (`mask` is as long as the steps, asserted).
        let m = if M { ms.next() } else { None };
        match (cur, m) {
            (Some(Some(p)), Some(m)) => outputs::<true>(xg, yg, s, z, p, r, m),
            (Some(Some(p)), None) => outputs::<false>(xg, yg, s, z, p, r, &mut none),
            (_, m) => portable(xg, yg, s, z, m.map(|m| m.as_mut_slice())),
        }
    }
    n * LANES
}

/// Whether the rule is symmetric with a range whose lower clamp never acts in groups whose
/// scale is a normal f32 ([`run512`]'s `SYM`). The symmetric scale is `s = max(amax / div,
/// eps)` (`div = (qmax - qmin) / 2`), so every `|x| <= amax` of the group has `|t| = |x *
/// (1 / s)| <= div * (1 + 2^-20)`: the three roundings (of `amax / div`, relative error
/// 2^-24 for a normal `s`, of `1 / s`, finite, and of the product) stay far below 2^-20
/// (an infinite `amax` gives `1 / s = 0` and `t` 0 or NaN). With `qmin + div * (1 + 2^-20) < 0.5`, every such
/// `t` lies above `qmin - 0.5` and its code `round(t) >= qmin` (int4: -8 + 7.5000072; any
/// `qmin = -qmax - 1` or `-qmax`), and `max(qmin, round(t))` is `round(t)`. A NaN `t`
/// stays NaN with or without that `max` (`min(hi, NaN)` is the NaN, as `max(lo, NaN)`
/// is).
fn symmetric_floor_idle(r: QRule) -> bool {
    match r.rule {
        Rule::Symmetric { div } => {
            f64::from(r.qmin) + f64::from(div) * (1.0 + 2f64.powi(-20)) < 0.5
        }
        _ => false,
    }
}

/// [`run`] with the output loop in AVX-512 registers ([`outputs512`]). With `M`, `mask`
/// holds `x.len() / 8` bytes (asserted) and gets the steps' masks; without, it is not
/// used. `SYM`: [`symmetric_floor_idle`] holds (every zero point 0, so the clamp bounds are
/// `qmin` and `qmax` for every group, and the lower clamp is left out; [`qparams`] sends a
/// step with a scale below the smallest normal f32, whose reciprocal may overflow, to the
/// portable kernel).
#[target_feature(enable = "avx2,avx512f")]
fn run512<const M: bool, const SYM: bool>(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    sc: &mut [f32],
    zp: &mut [f32],
    r: QRule,
    portable: PortableMasked<'_>,
    mask: &mut [u8],
) -> usize {
    let n = x.len() / (LANES * GROUP);
    assert!(y.len() == x.len() && sc.len() >= n * LANES && zp.len() >= n * LANES);
    assert!(!M || mask.len() * 8 == x.len());
    assert!(!SYM || symmetric_floor_idle(r));
    let mut ms = mask.as_chunks_mut::<STEP_BYTES>().0.iter_mut();
    let mut none = [0u8; STEP_BYTES];
    let xs = x.as_chunks::<{ LANES * GROUP }>().0;
    let ys = y.as_chunks_mut::<{ LANES * GROUP }>().0;
    let scs = sc.as_chunks_mut::<LANES>().0;
    let zps = zp.as_chunks_mut::<LANES>().0;
    // The per-group values the output loop broadcasts, computed with the next step's
    // qparams (their division overlaps the current step's outputs) into the slot the next
    // step reads: stored one step and loaded the next, the broadcasts are loads from
    // memory, not lane shuffles of a register.
    let mut lanes = [Lanes::default(); 2];
    let mut next = xs.first().map(|x0| qparams(x0, r));
    if let Some(Some(p)) = next {
        lanes[0] = Lanes::of(p, r);
    }
    for (k, (((xg, yg), s), z)) in xs.iter().zip(ys).zip(scs).zip(zps).enumerate() {
        let cur = next;
        next = xs.get(k + 1).map(|x1| qparams(x1, r));
        if let Some(Some(p)) = next {
            lanes[(k + 1) % 2] = Lanes::of(p, r);
        }
        // With `M` every step has its bytes (`mask` is as long as the steps, asserted).
        let m = if M { ms.next() } else { None };
        let l = &lanes[k % 2];
        match (cur, m) {
            (Some(Some(p)), Some(m)) => outputs512::<true, SYM>(xg, yg, s, z, p, l, r, m),
            (Some(Some(p)), None) => outputs512::<false, SYM>(xg, yg, s, z, p, l, r, &mut none),
            (_, m) => portable(xg, yg, s, z, m.map(|m| m.as_mut_slice())),
        }
    }
    n * LANES
}

/// The 32 inputs of group `g` of the step, as 4 vectors.
#[target_feature(enable = "avx2")]
#[inline]
fn load(xs: &[f32; LANES * GROUP], g: usize) -> [__m256; 4] {
    assert!(g < LANES);
    let p = xs[g * GROUP..].as_ptr();
    // SAFETY: `g < 8` (asserted) and `xs` holds 8 groups of 32 f32s, so `p[0..32]` is in
    // bounds; the loads read `p[0..8]`, `p[8..16]`, `p[16..24]`, `p[24..32]`, unaligned.
    unsafe {
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    }
}

/// `c ? a : b` lane-wise, `c` a comparison mask.
#[target_feature(enable = "avx2")]
#[inline]
fn sel(c: __m256, a: __m256, b: __m256) -> __m256 {
    _mm256_blendv_ps(b, a, c)
}

/// The scales and zero points of the 8 groups of a step, one group per lane.
#[derive(Clone, Copy)]
struct Params {
    scale: __m256,
    zero_point: __m256,
}

/// Per lane (group): the bits of the group's largest `|x|`, compared as signed integers:
/// for non-negative floats the integer order is the float order, and a NaN's `|x|` bits
/// exceed infinity's, so the maximum also tells whether the group holds a NaN.
#[target_feature(enable = "avx2")]
#[inline]
fn abs_max_bits(xs: &[f32; LANES * GROUP]) -> __m256i {
    let bits = _mm256_castps_si256;
    let imax = |a: __m256, b: __m256| _mm256_castsi256_ps(_mm256_max_epi32(bits(a), bits(b)));
    let abs = _mm256_set1_epi32(i32::MAX);
    let (m, _) = reduce8x2(
        |g| {
            let v = load(xs, g);
            let a = |i: usize| _mm256_castsi256_ps(_mm256_and_si256(bits(v[i]), abs));
            let m = imax(imax(a(0), a(1)), imax(a(2), a(3)));
            (m, m)
        },
        imax,
        imax,
    );
    bits(m)
}

/// Per lane (group): the minimum and maximum of each group; `None` when one holds a NaN.
#[target_feature(enable = "avx2")]
#[inline]
fn min_max(xs: &[f32; LANES * GROUP]) -> Option<(__m256, __m256)> {
    let mut nan = _mm256_setzero_ps();
    let (mn, mx) = reduce8x2(
        |g| {
            let v = load(xs, g);
            nan = _mm256_or_ps(
                nan,
                _mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_UNORD_Q>(v[0], v[1]),
                    _mm256_cmp_ps::<_CMP_UNORD_Q>(v[2], v[3]),
                ),
            );
            (
                _mm256_min_ps(_mm256_min_ps(v[0], v[1]), _mm256_min_ps(v[2], v[3])),
                _mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3])),
            )
        },
        |a, b| _mm256_min_ps(a, b),
        |a, b| _mm256_max_ps(a, b),
    );
    (_mm256_movemask_ps(nan) == 0).then_some((mn, mx))
}

/// The qparams of the 8 groups of a step, lane-wise with the portable kernel's selects in
/// its order (no FMA contraction); `None` when a group holds a NaN (the portable kernel
/// then takes the step: it gives NaN qparams and outputs to that group), and under a
/// symmetric rule when a scale is below the smallest normal f32 (see [`run512`]).
#[target_feature(enable = "avx2")]
#[inline]
fn qparams(xs: &[f32; LANES * GROUP], r: QRule) -> Option<Params> {
    let zero = _mm256_setzero_ps();
    let c = _mm256_set1_ps;
    let (qmin, qmax, eps) = (c(r.qmin), c(r.qmax), c(r.eps));
    // `if s < eps { eps } else { s }` (NaN stays NaN).
    let floor = |s: __m256| sel(_mm256_cmp_ps::<_CMP_LT_OQ>(s, eps), eps, s);
    let (scale, zero_point) = match r.rule {
        Rule::Symmetric { div } => {
            // `max(-min(min, 0), max(max, 0))` is the largest |x| (+0.0 for a group of
            // zeros, as the portable selects give): one integer reduction, NaN included.
            let m = abs_max_bits(xs);
            let inf = _mm256_set1_epi32(f32::INFINITY.to_bits() as i32);
            if _mm256_movemask_epi8(_mm256_cmpgt_epi32(m, inf)) != 0 {
                return None;
            }
            let s = floor(_mm256_div_ps(_mm256_castsi256_ps(m), c(div)));
            // A scale below the smallest normal (only with such an eps: 0 or subnormal)
            // may have an infinite reciprocal, which the AVX-512 loop without the lower
            // clamp cannot take: the portable kernel takes the step.
            if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(s, c(f32::MIN_POSITIVE))) != 0 {
                return None;
            }
            (s, zero)
        }
        Rule::Asymmetric => {
            let (mn, mx) = min_max(xs)?;
            let l = sel(_mm256_cmp_ps::<_CMP_LT_OQ>(mn, zero), mn, zero);
            let h = sel(_mm256_cmp_ps::<_CMP_GT_OQ>(mx, zero), mx, zero);
            let s = floor(_mm256_div_ps(_mm256_sub_ps(h, l), c(r.qmax - r.qmin)));
            let z = _mm256_sub_ps(qmin, round_small(_mm256_div_ps(l, s)));
            let z = sel(_mm256_cmp_ps::<_CMP_LT_OQ>(z, qmin), qmin, z);
            (s, sel(_mm256_cmp_ps::<_CMP_GT_OQ>(z, qmax), qmax, z))
        }
        Rule::Tinygemm { levels, mid } => {
            let (mn, mx) = min_max(xs)?;
            let s = floor(_mm256_div_ps(_mm256_sub_ps(mx, mn), c(levels)));
            let z = _mm256_add_ps(mn, _mm256_mul_ps(s, c(mid)));
            (
                s,
                _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(z),
            )
        }
    };
    Some(Params { scale, zero_point })
}

/// Stores the scales and zero points of a step to `sc` and `zp`, and returns per group its
/// reciprocal scale, clamp bounds `qmin - zp` and `qmax - zp` (zero point clamped to
/// ±[`MAX_ZERO_POINT`]) and scale, to broadcast.
#[target_feature(enable = "avx2")]
#[inline]
fn lanes_of(
    sc: &mut [f32; LANES],
    zp: &mut [f32; LANES],
    p: Params,
    r: QRule,
) -> ([f32; LANES], [f32; LANES], [f32; LANES], [f32; LANES]) {
    let c = _mm256_set1_ps;
    let (s, z) = (p.scale, p.zero_point);
    // SAFETY: `sc` and `zp` hold 8 f32s each; the unaligned stores write all 8.
    unsafe {
        _mm256_storeu_ps(sc.as_mut_ptr(), s);
        _mm256_storeu_ps(zp.as_mut_ptr(), z);
    }
    // `if z < -M { -M } else { z }`, then `if z > M { M } else { z }` (NaN stays NaN).
    let zc = _mm256_min_ps(c(MAX_ZERO_POINT), _mm256_max_ps(c(-MAX_ZERO_POINT), z));
    let lanes = |v: __m256| {
        let mut a = [0f32; LANES];
        // SAFETY: `a` holds 8 f32s; the unaligned store writes all 8.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        a
    };
    (
        lanes(_mm256_div_ps(c(1.0), s)),
        lanes(_mm256_sub_ps(c(r.qmin), zc)),
        lanes(_mm256_sub_ps(c(r.qmax), zc)),
        lanes(s),
    )
}

/// Per group of a step, the `t` whose code is strictly inside the range, as `in_lo <= t
/// <= in_hi` ([`strict_bounds`] of `qmin - zp` and `qmax - zp`, the zero point clamped to
/// ±[`MAX_ZERO_POINT`], as the portable kernels and [`backward_g32`] compute them).
#[target_feature(enable = "avx2")]
#[inline]
fn inside_bounds(p: Params, r: QRule) -> ([f32; LANES], [f32; LANES]) {
    let c = _mm256_set1_ps;
    let z = p.zero_point;
    let zc = _mm256_min_ps(c(MAX_ZERO_POINT), _mm256_max_ps(c(-MAX_ZERO_POINT), z));
    let (lo, hi) = strict_bounds(_mm256_sub_ps(c(r.qmin), zc), _mm256_sub_ps(c(r.qmax), zc));
    let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
    // SAFETY: `a` and `b` hold 8 f32s each; the unaligned stores write all 8.
    unsafe {
        _mm256_storeu_ps(a.as_mut_ptr(), lo);
        _mm256_storeu_ps(b.as_mut_ptr(), hi);
    }
    (a, b)
}

/// The 8 groups of a step from their qparams: scales and zero points to `sc` and `zp`,
/// outputs to `ys`, each group (still in L1) quantized from broadcasts; with `M`, the
/// straight-through mask bits of the step's elements to `m`.
#[target_feature(enable = "avx2")]
#[inline]
fn outputs<const M: bool>(
    xs: &[f32; LANES * GROUP],
    ys: &mut [MaybeUninit<f32>; LANES * GROUP],
    sc: &mut [f32; LANES],
    zp: &mut [f32; LANES],
    p: Params,
    r: QRule,
    m: &mut [u8; STEP_BYTES],
) {
    let c = _mm256_set1_ps;
    let (inv, qlo, qhi, scale) = lanes_of(sc, zp, p, r);
    let (in_lo, in_hi) = if M {
        inside_bounds(p, r)
    } else {
        ([0.0; LANES], [0.0; LANES])
    };
    for g in 0..LANES {
        let (vi, vl, vh, vs) = (c(inv[g]), c(qlo[g]), c(qhi[g]), c(scale[g]));
        let (il, ih) = (c(in_lo[g]), c(in_hi[g]));
        let out = ys[g * GROUP..].as_mut_ptr().cast::<f32>();
        for (i, v) in load(xs, g).into_iter().enumerate() {
            // `if t < lo { lo } else { t }` is `max(lo, t)` and `if t > hi { hi } else { t }`
            // is `min(hi, t)`, NaN kept (the second operand).
            let t = _mm256_mul_ps(v, vi);
            if M {
                let inside = _mm256_and_ps(
                    _mm256_cmp_ps::<_CMP_GE_OQ>(t, il),
                    _mm256_cmp_ps::<_CMP_LE_OQ>(t, ih),
                );
                // Lane j is element 8 * i + j of group g: bit j of byte 4 * g + i.
                m[4 * g + i] = _mm256_movemask_ps(inside) as u8;
            }
            let t = _mm256_min_ps(vh, _mm256_max_ps(vl, t));
            let yv = _mm256_mul_ps(round_small(t), vs);
            // SAFETY: `g < 8` and `ys` holds 8 groups of 32 f32 slots (`MaybeUninit<f32>`
            // has f32's layout), so `out[0..32]` is in bounds; `i < 4`, the store writes
            // `out[8 * i..8 * i + 8]`.
            unsafe { _mm256_storeu_ps(out.add(8 * i), yv) };
        }
    }
}

/// Per group of a step (lane `g` is group `g`): what [`outputs512`] broadcasts.
#[derive(Clone, Copy, Default)]
struct Lanes {
    /// `1 / scale`.
    inv: [f32; LANES],
    /// The clamp bounds `qmin - zp` and `qmax - zp` (zero point clamped to
    /// ±[`MAX_ZERO_POINT`]): integers of magnitude below 2^22.
    lo: [f32; LANES],
    hi: [f32; LANES],
    scale: [f32; LANES],
}

impl Lanes {
    /// [`lanes_of`]'s values (without storing the qparams).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn of(p: Params, r: QRule) -> Lanes {
        let c = _mm256_set1_ps;
        let zc = _mm256_min_ps(
            c(MAX_ZERO_POINT),
            _mm256_max_ps(c(-MAX_ZERO_POINT), p.zero_point),
        );
        let mut l = Lanes::default();
        // SAFETY: each array holds 8 f32s; the unaligned stores write all 8.
        unsafe {
            _mm256_storeu_ps(l.inv.as_mut_ptr(), _mm256_div_ps(c(1.0), p.scale));
            _mm256_storeu_ps(l.lo.as_mut_ptr(), _mm256_sub_ps(c(r.qmin), zc));
            _mm256_storeu_ps(l.hi.as_mut_ptr(), _mm256_sub_ps(c(r.qmax), zc));
            _mm256_storeu_ps(l.scale.as_mut_ptr(), p.scale);
        }
        l
    }
}

/// [`outputs`] in AVX-512 registers (16 lanes, two per group), the same bits: the code is
/// rounded before it is clamped, `min(hi, max(lo, round(t)))`, which equals
/// `round(min(hi, max(lo, t)))` because `lo` and `hi` are integers below 2^22 in
/// magnitude and the rounding `(t + MAGIC) - MAGIC` is monotone and leaves them fixed (a
/// NaN `t` stays NaN either way). The mask bit is then `lo < round(t) < hi` on the
/// rounded code, the strict inside of [`strict_bounds`] (for |t| >= 2^22 the rounding
/// keeps `t` beyond both bounds, as the exact code is). With `SYM` the bounds are `qmin`
/// and `qmax` for every group and the lower clamp `max(lo, .)` is left out (the caller
/// runs it only where that clamp cannot act: [`symmetric_floor_idle`], and scales of at
/// least the smallest normal f32, whose reciprocals are finite).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,avx512f")]
#[inline]
fn outputs512<const M: bool, const SYM: bool>(
    xs: &[f32; LANES * GROUP],
    ys: &mut [MaybeUninit<f32>; LANES * GROUP],
    sc: &mut [f32; LANES],
    zp: &mut [f32; LANES],
    p: Params,
    l: &Lanes,
    r: QRule,
    m: &mut [u8; STEP_BYTES],
) {
    // SAFETY: `sc` and `zp` hold 8 f32s each; the unaligned stores write all 8.
    unsafe {
        _mm256_storeu_ps(sc.as_mut_ptr(), p.scale);
        _mm256_storeu_ps(zp.as_mut_ptr(), p.zero_point);
    }
    let c = _mm512_set1_ps;
    let magic = c(MAGIC);
    let (qmin, qmax) = (c(r.qmin), c(r.qmax));
    for g in 0..LANES {
        let (vi, vs) = (c(l.inv[g]), c(l.scale[g]));
        let (vl, vh) = if SYM {
            (qmin, qmax)
        } else {
            (c(l.lo[g]), c(l.hi[g]))
        };
        let (xg, yg) = (
            &xs.as_chunks::<GROUP>().0[g],
            &mut ys.as_chunks_mut::<GROUP>().0[g],
        );
        let out = yg.as_mut_ptr().cast::<f32>();
        for (i, h) in xg.as_chunks::<16>().0.iter().enumerate() {
            // SAFETY: `h` holds 16 f32s; the unaligned load reads all 16.
            let v = unsafe { _mm512_loadu_ps(h.as_ptr()) };
            let t = _mm512_mul_ps(v, vi);
            let q = _mm512_sub_ps(_mm512_add_ps(t, magic), magic);
            if M {
                let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(q, vl);
                let inside = _mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(above, q, vh);
                // Lane j is element 16 * i + j of group g: bytes 4 * g + 2 * i and the next.
                m[4 * g + 2 * i..4 * g + 2 * i + 2].copy_from_slice(&inside.to_le_bytes());
            }
            let q = if SYM { q } else { _mm512_max_ps(vl, q) };
            let yv = _mm512_mul_ps(_mm512_min_ps(vh, q), vs);
            // SAFETY: `yg` holds 32 f32 slots (`MaybeUninit<f32>` has f32's layout) and
            // `i < 2`, so the store writes `out[16 * i..16 * i + 16]`, in bounds.
            unsafe { _mm512_storeu_ps(out.add(16 * i), yv) };
        }
    }
}

/// The straight-through backward of the first `8 * k` groups of 32 (`k` as large as `x`
/// allows) with the forward's scales and zero points, the portable `backward_block_f32`'s
/// bits; returns how many groups it did (0 without AVX2). `dy` and `dx` as long as `x`,
/// `sc` and `zp` one per group.
pub(crate) fn backward_g32(
    x: &[f32],
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
    sc: &[f32],
    zp: &[f32],
    (qmin, qmax): (f32, f32),
) -> usize {
    if !is_x86_feature_detected!("avx2") {
        return 0;
    }
    // SAFETY: AVX2 was detected on this CPU just above.
    unsafe { run_backward(x, dy, dx, sc, zp, (qmin, qmax)) }
}

#[target_feature(enable = "avx2")]
fn run_backward(
    x: &[f32],
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
    sc: &[f32],
    zp: &[f32],
    (qmin, qmax): (f32, f32),
) -> usize {
    let n = x.len() / (LANES * GROUP);
    assert!(dy.len() == x.len() && dx.len() == x.len());
    assert!(sc.len() >= n * LANES && zp.len() >= n * LANES);
    let c = _mm256_set1_ps;
    let steps = x
        .as_chunks::<{ LANES * GROUP }>()
        .0
        .iter()
        .zip(dy.as_chunks::<{ LANES * GROUP }>().0)
        .zip(dx.as_chunks_mut::<{ LANES * GROUP }>().0)
        .zip(
            sc.as_chunks::<LANES>()
                .0
                .iter()
                .zip(zp.as_chunks::<LANES>().0),
        );
    for (((xs, ds), os), (s8, z8)) in steps {
        // SAFETY: `s8` and `z8` hold 8 f32s each; the unaligned loads read all 8.
        let (s, z) = unsafe { (_mm256_loadu_ps(s8.as_ptr()), _mm256_loadu_ps(z8.as_ptr())) };
        // `zp.clamp(-M, M)` (NaN stays NaN).
        let z = _mm256_min_ps(c(MAX_ZERO_POINT), _mm256_max_ps(c(-MAX_ZERO_POINT), z));
        let inv = _mm256_div_ps(c(1.0), s);
        let (in_lo, in_hi) = strict_bounds(_mm256_sub_ps(c(qmin), z), _mm256_sub_ps(c(qmax), z));
        let lanes = |v: __m256| {
            let mut a = [0f32; LANES];
            // SAFETY: `a` holds 8 f32s; the unaligned store writes all 8.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
            a
        };
        let (inv, in_lo, in_hi, s) = (lanes(inv), lanes(in_lo), lanes(in_hi), lanes(s));
        for g in 0..LANES {
            let (vi, vl, vh, vs) = (c(inv[g]), c(in_lo[g]), c(in_hi[g]), c(s[g]));
            let (xv, dv) = (load(xs, g), load(ds, g));
            let out = os[g * GROUP..].as_mut_ptr().cast::<f32>();
            for i in 0..4 {
                let t = _mm256_mul_ps(xv[i], vi);
                let inside = _mm256_and_ps(
                    _mm256_cmp_ps::<_CMP_GE_OQ>(t, vl),
                    _mm256_cmp_ps::<_CMP_LE_OQ>(t, vh),
                );
                let g = _mm256_mul_ps(_mm256_mul_ps(dv[i], vs), vi);
                // SAFETY: `g < 8` and `os` holds 8 groups of 32 f32 slots
                // (`MaybeUninit<f32>` has f32's layout), so `out[0..32]` is in bounds;
                // `i < 4`, the store writes `out[8 * i..8 * i + 8]`.
                unsafe { _mm256_storeu_ps(out.add(8 * i), _mm256_and_ps(inside, g)) };
            }
        }
    }
    n * LANES
}

/// The straight-through backward from a forward's mask over whole groups of `len` (a
/// multiple of 8): `dx = bit ? (dy * scale) * (1/scale) : 0`, the portable
/// `backward_masked_block`'s bits. Returns whether it ran (false without AVX2, or for
/// sizes that do not fit: then nothing is written). AVX-512 mask registers where the CPU
/// has AVX-512F and `len` is a multiple of 16, else AVX2.
pub(crate) fn backward_masked(
    dy: &[f32],
    mask: &[u8],
    dx: &mut [MaybeUninit<f32>],
    sc: &[f32],
    len: usize,
) -> bool {
    let fits = len > 0
        && len.is_multiple_of(8)
        && dx.len() == dy.len()
        && mask.len() * 8 == dy.len()
        && sc.len() * len == dy.len();
    if !fits || !is_x86_feature_detected!("avx2") {
        return false;
    }
    if len.is_multiple_of(16) && is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX2 and AVX-512F were detected on this CPU just above.
        unsafe { backward_masked512(dy, mask, dx, sc, len) };
    } else {
        // SAFETY: AVX2 was detected on this CPU just above.
        unsafe { backward_masked256(dy, mask, dx, sc, len) };
    }
    true
}

/// [`backward_masked`] in AVX-512 registers, `len` a multiple of 16 (asserted): groups of
/// 16, 32 and 64 in flat loops of whole groups ([`backward_masked512_short`]), longer ones
/// group by group.
#[target_feature(enable = "avx2,avx512f")]
fn backward_masked512(
    dy: &[f32],
    mask: &[u8],
    dx: &mut [MaybeUninit<f32>],
    sc: &[f32],
    len: usize,
) {
    assert!(
        len > 0
            && len.is_multiple_of(16)
            && dx.len() == dy.len()
            && mask.len() * 8 == dy.len()
            && sc.len() * len == dy.len()
    );
    match len {
        16 => return backward_masked512_short::<1>(dy, mask, dx, sc),
        32 => return backward_masked512_short::<2>(dy, mask, dx, sc),
        64 => return backward_masked512_short::<4>(dy, mask, dx, sc),
        _ => {}
    }
    let groups = dy
        .chunks(len)
        .zip(mask.chunks(len / 8))
        .zip(dx.chunks_mut(len));
    for (((dg, mg), og), &s) in groups.zip(sc) {
        let (vs, vi) = (_mm512_set1_ps(s), _mm512_set1_ps(1.0 / s));
        let (ds, os) = (dg.as_chunks::<16>().0, og.as_chunks_mut::<16>().0);
        for ((d, o), m) in ds.iter().zip(os).zip(mg.as_chunks::<2>().0) {
            // SAFETY: `d` holds 16 f32s; the unaligned load reads all 16.
            let d = unsafe { _mm512_loadu_ps(d.as_ptr()) };
            // Bit j of the two bytes is lane j (element 16 * i + j of the group).
            let k = u16::from_le_bytes(*m);
            let g = _mm512_maskz_mul_ps(k, _mm512_mul_ps(d, vs), vi);
            // SAFETY: `o` holds 16 f32 slots (`MaybeUninit<f32>` has f32's layout); the
            // unaligned store writes all 16.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().cast::<f32>(), g) };
        }
    }
}

/// [`backward_masked512`] for groups of `16 * P` elements: 16 groups at a time, their
/// reciprocals in one division (IEEE: the scalar `1.0 / s`'s bits), then their `P`
/// vectors each, in one loop over fixed-size arrays (no per-group slicing). The sizes
/// fit (asserted by the caller; the zips stop at the shortest).
#[target_feature(enable = "avx2,avx512f")]
#[inline]
fn backward_masked512_short<const P: usize>(
    dy: &[f32],
    mask: &[u8],
    dx: &mut [MaybeUninit<f32>],
    sc: &[f32],
) {
    // One group: `P` vectors of gradient, mask and output.
    type G<T, const N: usize, const P: usize> = [[T; N]; P];
    #[target_feature(enable = "avx2,avx512f")]
    #[inline]
    fn group<const P: usize>(
        d: &G<f32, 16, P>,
        m: &G<u8, 2, P>,
        o: &mut G<MaybeUninit<f32>, 16, P>,
        vs: __m512,
        vi: __m512,
    ) {
        for p in 0..P {
            // SAFETY: `d[p]` holds 16 f32s (unaligned load) and `o[p]` 16 f32 slots
            // (`MaybeUninit<f32>` has f32's layout; unaligned store of all 16).
            unsafe {
                let v = _mm512_loadu_ps(d[p].as_ptr());
                // Bit j of the two bytes is lane j.
                let k = u16::from_le_bytes(m[p]);
                let g = _mm512_maskz_mul_ps(k, _mm512_mul_ps(v, vs), vi);
                _mm512_storeu_ps(o[p].as_mut_ptr().cast::<f32>(), g);
            }
        }
    }
    let ds = dy.as_chunks::<16>().0.as_chunks::<P>().0;
    let ms = mask.as_chunks::<2>().0.as_chunks::<P>().0;
    let os = dx.as_chunks_mut::<16>().0.as_chunks_mut::<P>().0;
    let (sh, st) = sc.as_chunks::<16>();
    let blocks = ds
        .as_chunks::<16>()
        .0
        .iter()
        .zip(ms.as_chunks::<16>().0)
        .zip(os.as_chunks_mut::<16>().0);
    for (((d16, m16), o16), s16) in blocks.zip(sh) {
        // SAFETY: `s16` holds 16 f32s; the unaligned load reads all 16.
        let s = unsafe { _mm512_loadu_ps(s16.as_ptr()) };
        let inv = _mm512_div_ps(_mm512_set1_ps(1.0), s);
        let ks = (0..16).map(|k| _mm512_set1_epi32(k));
        for ((((d, m), o), k), &sk) in d16.iter().zip(m16).zip(o16).zip(ks).zip(s16) {
            // Lane k of the reciprocals, in every lane (one permute, no scalar division).
            let vi = _mm512_permutexvar_ps(k, inv);
            group::<P>(d, m, o, _mm512_set1_ps(sk), vi);
        }
    }
    let done = sh.len() * 16;
    let rest = ds[done..].iter().zip(&ms[done..]).zip(&mut os[done..]);
    for (((d, m), o), &s) in rest.zip(st) {
        group::<P>(d, m, o, _mm512_set1_ps(s), _mm512_set1_ps(1.0 / s));
    }
}

#[target_feature(enable = "avx2")]
fn backward_masked256(
    dy: &[f32],
    mask: &[u8],
    dx: &mut [MaybeUninit<f32>],
    sc: &[f32],
    len: usize,
) {
    let bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let groups = dy
        .chunks(len)
        .zip(mask.chunks(len / 8))
        .zip(dx.chunks_mut(len));
    for (((dg, mg), og), &s) in groups.zip(sc) {
        let (vs, vi) = (_mm256_set1_ps(s), _mm256_set1_ps(1.0 / s));
        let (ds, os) = (dg.as_chunks::<8>().0, og.as_chunks_mut::<8>().0);
        for ((d, o), &b) in ds.iter().zip(os).zip(mg) {
            // SAFETY: `d` holds 8 f32s; the unaligned load reads all 8.
            let d = unsafe { _mm256_loadu_ps(d.as_ptr()) };
            // Lane j all ones where bit j of the byte is set.
            let on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b as i32), bit), bit);
            let g = _mm256_mul_ps(_mm256_mul_ps(d, vs), vi);
            let g = _mm256_and_ps(_mm256_castsi256_ps(on), g);
            // SAFETY: `o` holds 8 f32 slots (`MaybeUninit<f32>` has f32's layout); the
            // unaligned store writes all 8.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().cast::<f32>(), g) };
        }
    }
}

/// Per-group bounds of the portable `dynamic_block_f32_masked`'s output loop, one entry per
/// group: reciprocal scale, clamp bounds, scale, strict-inside bounds of the mask.
pub(crate) struct GroupBounds<'a> {
    pub inv: &'a [f32],
    pub lo: &'a [f32],
    pub hi: &'a [f32],
    pub scale: &'a [f32],
    pub in_lo: &'a [f32],
    pub in_hi: &'a [f32],
}

/// The output loop of the portable `dynamic_block_f32_masked` with a mask, in AVX-512
/// registers (the same operations in the same order, lane for lane, the mask bits from
/// mask-register comparisons): returns whether it ran (false without AVX-512F, for `len`
/// not a multiple of 16, or sizes that do not fit: then nothing is written).
pub(crate) fn outputs_masked(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    mask: &mut [u8],
    len: usize,
    b: &GroupBounds<'_>,
) -> bool {
    let g = x.len() / len.max(1);
    let fits = len > 0
        && len.is_multiple_of(16)
        && y.len() == x.len()
        && mask.len() * 8 == x.len()
        && g * len == x.len()
        && [b.inv, b.lo, b.hi, b.scale, b.in_lo, b.in_hi]
            .iter()
            .all(|v| v.len() >= g);
    if !fits || !is_x86_feature_detected!("avx512f") || !is_x86_feature_detected!("avx2") {
        return false;
    }
    // SAFETY: AVX2 and AVX-512F were detected on this CPU just above.
    unsafe { outputs_masked512(x, y, mask, len, b) };
    true
}

#[target_feature(enable = "avx2,avx512f")]
fn outputs_masked512(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    mask: &mut [u8],
    len: usize,
    b: &GroupBounds<'_>,
) {
    let c = _mm512_set1_ps;
    let magic = c(MAGIC);
    let groups = x
        .chunks(len)
        .zip(y.chunks_mut(len))
        .zip(mask.chunks_mut(len / 8));
    for (k, ((xg, yg), mg)) in groups.enumerate() {
        let (vi, vl, vh, vs) = (c(b.inv[k]), c(b.lo[k]), c(b.hi[k]), c(b.scale[k]));
        let (il, ih) = (c(b.in_lo[k]), c(b.in_hi[k]));
        let (xs, ys) = (xg.as_chunks::<16>().0, yg.as_chunks_mut::<16>().0);
        for ((h, o), m) in xs.iter().zip(ys).zip(mg.as_chunks_mut::<2>().0) {
            // SAFETY: `h` holds 16 f32s; the unaligned load reads all 16.
            let v = unsafe { _mm512_loadu_ps(h.as_ptr()) };
            let t = _mm512_mul_ps(v, vi);
            let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(t, il);
            let inside = _mm512_mask_cmp_ps_mask::<_CMP_LE_OQ>(ge, t, ih);
            *m = inside.to_le_bytes();
            let t = _mm512_min_ps(vh, _mm512_max_ps(vl, t));
            let yv = _mm512_mul_ps(_mm512_sub_ps(_mm512_add_ps(t, magic), magic), vs);
            // SAFETY: `o` holds 16 f32 slots (`MaybeUninit<f32>` has f32's layout); the
            // unaligned store writes all 16.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().cast::<f32>(), yv) };
        }
    }
}

/// The portable `strict_bounds`, lane-wise: the `t` whose code `round_half_even(t)` lies
/// strictly between the integers `lo` and `hi`, as `in_lo <= t <= in_hi` (`(inf, -inf)`
/// when empty or NaN).
#[target_feature(enable = "avx2")]
#[inline]
fn strict_bounds(lo: __m256, hi: __m256) -> (__m256, __m256) {
    let c = _mm256_set1_ps;
    let (a, b) = (_mm256_add_ps(lo, c(1.0)), _mm256_sub_ps(hi, c(1.0)));
    let (la, hb) = (_mm256_sub_ps(a, c(0.5)), _mm256_add_ps(b, c(0.5)));
    // `(v as i32) & 1 == 1` (integral v within i32; NaN converts to an even value, as
    // `as` gives 0).
    let odd = |v: __m256| {
        let one = _mm256_set1_epi32(1);
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(
            _mm256_and_si256(_mm256_cvttps_epi32(v), one),
            one,
        ))
    };
    // One ulp away from (`toward_up`: up if `v > 0`) or toward 0 in the bits.
    let step = |v: __m256, toward_up: bool| {
        let pos = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_setzero_ps()));
        // `pos` is -1 where v > 0, else 0: `2 * pos + 1` is -1 or +1.
        let d = _mm256_add_epi32(_mm256_add_epi32(pos, pos), _mm256_set1_epi32(1));
        let d = if toward_up {
            _mm256_sub_epi32(_mm256_setzero_si256(), d)
        } else {
            d
        };
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(v), d))
    };
    let in_lo = sel(odd(a), step(la, true), la);
    let in_hi = sel(odd(b), step(hb, false), hb);
    let ok = _mm256_cmp_ps::<_CMP_LE_OQ>(a, b);
    (
        sel(ok, in_lo, c(f32::INFINITY)),
        sel(ok, in_hi, c(f32::NEG_INFINITY)),
    )
}

/// `(v + MAGIC) - MAGIC`: `v` rounded half to even for |v| < 2^22 (the portable kernel's
/// `round_small`).
#[target_feature(enable = "avx2")]
#[inline]
fn round_small(v: __m256) -> __m256 {
    let magic = _mm256_set1_ps(MAGIC);
    _mm256_sub_ps(_mm256_add_ps(v, magic), magic)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 and AVX-512 output loops give the same bits (the portable kernel is
    /// compared with the default one in `intx_kernel`'s tests): every rule, random groups
    /// at several magnitudes, zero groups, offsets that make zero points large. Both hand
    /// the same steps to the portable kernel: none, but under a symmetric rule with eps 0
    /// those with a scale below the smallest normal (zero and 1e-40 groups).
    #[test]
    fn avx512_outputs_match_avx2_bitwise() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avx512f")) {
            return;
        }
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut x = Vec::new();
        for scale in [1.0f32, 1e-3, 3.0e4, 1e-40, 1e30] {
            for k in 0..64 {
                for _ in 0..GROUP {
                    s = s
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                    x.push((u * 2.0 - 1.0 + (k % 5) as f32 * 0.75) * scale);
                }
            }
        }
        x.extend([0.0f32; 8 * GROUP]);
        let rules = [
            (Rule::Symmetric { div: 7.5 }, -8.0, 7.0),
            (Rule::Asymmetric, -128.0, 127.0),
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
            for eps in [f32::EPSILON, 0.0] {
                let r = QRule {
                    rule,
                    qmin,
                    qmax,
                    eps,
                    narrow: Narrow::F32,
                };
                let g = x.len() / GROUP;
                let run = |wide: bool| {
                    let mut y = vec![MaybeUninit::new(f32::NAN); x.len()];
                    let (mut sc, mut zp) = (vec![0f32; g], vec![0f32; g]);
                    // The steps given to the portable kernel (their outputs stay NaN, their
                    // qparams 0, in both runs).
                    let mut calls = 0;
                    let mut count =
                        |_: &[f32], _: &mut [MaybeUninit<f32>], _: &mut [f32], _: &mut [f32]| {
                            calls += 1
                        };
                    let done = dynamic_g32_at(&x, &mut y, &mut sc, &mut zp, r, &mut count, wide);
                    assert_eq!(done, g);
                    let tiny = matches!(rule, Rule::Symmetric { .. }) && eps == 0.0;
                    assert_eq!(calls, if tiny { 64 / 8 + 1 } else { 0 }, "{rule:?}");
                    // SAFETY: `y` was created initialised (NaN).
                    let y: Vec<u32> = y
                        .iter()
                        .map(|v| unsafe { v.assume_init() }.to_bits())
                        .collect();
                    (y, sc, zp)
                };
                let (a, b) = (run(false), run(true));
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a.1), bits(&b.1), "{rule:?} eps {eps}: scales");
                assert_eq!(bits(&a.2), bits(&b.2), "{rule:?} eps {eps}: zero points");
                for (i, v) in x.iter().enumerate() {
                    assert_eq!(a.0[i], b.0[i], "{rule:?} eps {eps}: element {i} = {v:e}");
                }
            }
        }
    }

    /// With a mask, the AVX2 and AVX-512 step kernels give the same outputs, qparams and
    /// mask bits, and the outputs of the unmasked kernels; the AVX2 and AVX-512 masked
    /// backwards give the same bits.
    #[test]
    fn masked_avx2_and_avx512_kernels_agree_bitwise() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avx512f")) {
            return;
        }
        let mut s: u64 = 0x2545_f491_4f6c_dd1d;
        let x: Vec<f32> = (0..64 * LANES * GROUP)
            .map(|i| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                (u * 2.0 - 1.0 + (i / GROUP % 5) as f32 * 0.5) * [1.0, 1e-3, 3e4][i / 256 % 3]
            })
            .collect();
        let rules = [
            (Rule::Symmetric { div: 7.5 }, -8.0, 7.0),
            (Rule::Asymmetric, -128.0, 127.0),
            (
                Rule::Tinygemm {
                    levels: 15.0,
                    mid: 8.0,
                },
                0.0,
                15.0,
            ),
        ];
        let g = x.len() / GROUP;
        let bits = |v: &[MaybeUninit<f32>]| {
            // SAFETY: every vector passed here was created initialised (NaN).
            v.iter()
                .map(|f| unsafe { f.assume_init() }.to_bits())
                .collect::<Vec<_>>()
        };
        for (rule, qmin, qmax) in rules {
            let r = QRule {
                rule,
                qmin,
                qmax,
                eps: f32::EPSILON,
                narrow: Narrow::F32,
            };
            let run = |wide: bool, masked: bool| {
                let mut y = vec![MaybeUninit::new(f32::NAN); x.len()];
                let (mut sc, mut zp) = (vec![0f32; g], vec![0f32; g]);
                let mut m = vec![0u8; x.len() / 8];
                let mut never =
                    |_: &[f32],
                     _: &mut [MaybeUninit<f32>],
                     _: &mut [f32],
                     _: &mut [f32],
                     _: Option<&mut [u8]>| { panic!("no NaN in these inputs") };
                let mk = masked.then_some(m.as_mut_slice());
                let done = dispatch(&x, &mut y, &mut sc, &mut zp, r, &mut never, mk, wide);
                assert_eq!(done, g);
                (bits(&y), sc, zp, m)
            };
            let (a, b, plain) = (run(false, true), run(true, true), run(true, false));
            assert_eq!(a.0, b.0, "{rule:?}: outputs");
            assert_eq!(a.0, plain.0, "{rule:?}: outputs with and without a mask");
            assert_eq!(a.1, b.1, "{rule:?}: scales");
            assert_eq!(a.2, b.2, "{rule:?}: zero points");
            assert_eq!(a.3, b.3, "{rule:?}: masks");
            assert!(
                a.3.iter().any(|&m| m != 0xff),
                "{rule:?}: some codes clamped"
            );
            let dy: Vec<f32> = (0..x.len()).map(|i| (i % 11) as f32 * 0.4 - 2.0).collect();
            let mut d512 = vec![MaybeUninit::new(f32::NAN); x.len()];
            let mut d256 = vec![MaybeUninit::new(f32::NAN); x.len()];
            // SAFETY: AVX2 and AVX-512F were detected above; the sizes fit (one scale per
            // group of 32, one mask byte per 8 elements).
            unsafe {
                backward_masked512(&dy, &a.3, &mut d512, &a.1, GROUP);
                backward_masked256(&dy, &a.3, &mut d256, &a.1, GROUP);
            }
            assert_eq!(bits(&d512), bits(&d256), "{rule:?}: masked backward");
        }
    }
}
