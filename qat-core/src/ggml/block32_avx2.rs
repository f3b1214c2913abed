//! The AVX2 + F16C + FMA forward of the 32-element GGML block types, bit-exact with the portable
//! kernel in [`super::block32`] (which stays the reference, and which this kernel calls for
//! every block it does not handle).
//!
//! Blocks go 8 at a time: each block's statistic is reduced to one lane of a vector (an 8x8
//! transpose of partial maxima), the 8 scales divided, range-checked and rounded to f16 with
//! F16C (`vcvtps2ph`, round to nearest even: `f16::from_f32`'s rounding) together, then each
//! block (still in L1) is quantized and dequantized from broadcasts of its lane.
//!
//! The fast path takes the *ordinary* blocks: no NaN in the 8 blocks, a scale `d` that is a
//! normal f32 (neither zero, subnormal nor infinite). There `id = 1 / d` is within 1 ulp
//! and `|x| <= max|x|`, so `|x * id|` exceeds the code range's half-width by at most a few
//! ulps: no code can saturate below, and the `as` casts of candle's expressions reduce to
//! `trunc` plus the one upper `min` a code can reach (Q4_0 and Q5_0, whose `x = -max`
//! maps to 16 and 32), and no tie the portable kernel resolves by position (Q4_0/Q5_0
//! blocks holding both `+amax` and `-amax`, Q4_1/Q5_1 blocks whose minimum or maximum is a
//! zero, whose sign candle's fold decides). Every other block goes to the portable kernel.
//! Each f32 operation is the portable kernel's, in the same order, so the values are the
//! same bits; the one exception is the last step of Q8_0, Q4_1 and Q5_1, a product of a
//! code and the f16 scale (exact: at most 8 + 11 significant bits) plus the minimum (or
//! +0.0; Q8_0 takes the fast path only with an f16 scale above 0, where a code of -0.0
//! must give +0.0), fused into one FMA, whose single rounding is then the sum's. Tests
//! below compare the kernels on random and adversarial blocks. The statistics of the next
//! 8 blocks are computed before the outputs of the current 8 (software pipelining: the
//! divisions' and conversions' latency overlaps independent work). Where the CPU has
//! AVX-512F the output loop runs the same operations 16 lanes at a time.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::block32::{self, Kind32, QK};
use crate::x86_lanes::reduce8x2;

/// Runs the AVX2 forward when the CPU has AVX2 and F16C (else returns `false`, writing
/// nothing); `x.len()` a multiple of 32 and `y` as long.
pub(crate) fn try_forward(kind: Kind32, x: &[f32], y: &mut [MaybeUninit<f32>]) -> bool {
    try_forward_at(kind, x, y, true)
}

/// [`try_forward`], with the AVX-512 output loop where the CPU has AVX-512F and `wide`
/// (tests run both).
fn try_forward_at(kind: Kind32, x: &[f32], y: &mut [MaybeUninit<f32>], wide: bool) -> bool {
    if !(is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("fma"))
    {
        return false;
    }
    if wide && is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX2, F16C, FMA and AVX-512F were detected on this CPU just above.
        unsafe {
            match kind {
                Kind32::Q8_0 => run512::<Q8_0>(x, y),
                Kind32::Q4_0 => run512::<Q4_0>(x, y),
                Kind32::Q4_1 => run512::<Q4_1>(x, y),
                Kind32::Q5_0 => run512::<Q5_0>(x, y),
                Kind32::Q5_1 => run512::<Q5_1>(x, y),
            }
        }
        return true;
    }
    // SAFETY: AVX2, F16C and FMA were detected on this CPU just above.
    unsafe {
        match kind {
            Kind32::Q8_0 => run::<Q8_0>(x, y),
            Kind32::Q4_0 => run::<Q4_0>(x, y),
            Kind32::Q4_1 => run::<Q4_1>(x, y),
            Kind32::Q5_0 => run::<Q5_0>(x, y),
            Kind32::Q5_1 => run::<Q5_1>(x, y),
        }
    }
    true
}

/// The straight-through backward (`dx = dy` where the code was not clamped, else 0) when
/// the CPU has AVX2, F16C and FMA (else returns `false`, writing nothing); `x.len()` a
/// multiple of 32, `dy` and `dx` as long. Blocks go 8 at a time with the forward's
/// statistics; in a fast-path block (see the module docs) no code of Q8_0, Q4_1 or Q5_1
/// is clamped (`|x * id| <= 127`, `(x - min) * id + 0.5 < 16` (32) up to a few ulps), so
/// `dx = dy`, and Q4_0 / Q5_0 clamp exactly where `x * id + 8.5 >= 16` (`+ 16.5 >= 32`),
/// the portable kernel's test with its lower half always true. Other blocks take the
/// portable kernel.
pub(crate) fn try_backward(
    kind: Kind32,
    x: &[f32],
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
) -> bool {
    if !(is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("fma"))
    {
        return false;
    }
    // SAFETY: AVX2, F16C and FMA were detected on this CPU just above.
    unsafe {
        match kind {
            Kind32::Q8_0 => run_backward::<Q8_0>(x, dy, dx),
            Kind32::Q4_0 => run_backward::<Q4_0>(x, dy, dx),
            Kind32::Q4_1 => run_backward::<Q4_1>(x, dy, dx),
            Kind32::Q5_0 => run_backward::<Q5_0>(x, dy, dx),
            Kind32::Q5_1 => run_backward::<Q5_1>(x, dy, dx),
        }
    }
    true
}

#[target_feature(enable = "avx2,f16c,fma")]
fn run_backward<const K: u8>(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
    assert!(x.len() == dy.len() && x.len() == dx.len() && x.len().is_multiple_of(QK));
    let (xg, xt) = x.as_chunks::<{ LANES * QK }>();
    let (dg, dt) = dy.as_chunks::<{ LANES * QK }>();
    let (og, ot) = dx.as_chunks_mut::<{ LANES * QK }>();
    for ((xs, ds), os) in xg.iter().zip(dg).zip(og) {
        match stats::<K>(xs) {
            Some(st) => grad::<K>(xs, ds, os, &st),
            None => block32::backward_portable(kind_of(K), xs, ds, os),
        }
    }
    // The last blocks (fewer than 8).
    block32::backward_portable(kind_of(K), xt, dt, ot);
}

/// The gradient of 8 blocks from their [`Stats`] (see [`try_backward`]).
#[target_feature(enable = "avx2,f16c,fma")]
#[inline]
fn grad<const K: u8>(
    xs: &[f32; LANES * QK],
    ds: &[f32; LANES * QK],
    os: &mut [MaybeUninit<f32>; LANES * QK],
    st: &Stats,
) {
    let c = _mm256_set1_ps;
    for b in 0..LANES {
        let (xb, db, ob) = (
            &xs.as_chunks::<QK>().0[b],
            &ds.as_chunks::<QK>().0[b],
            &mut os.as_chunks_mut::<QK>().0[b],
        );
        if st.ok & (1 << b) == 0 {
            block32::backward_portable(kind_of(K), xb, db, ob);
            continue;
        }
        let vid = c(st.id[b]);
        let out = ob.as_mut_ptr().cast::<f32>();
        let mut nan = _mm256_setzero_ps();
        for i in 0..QK / 8 {
            // SAFETY: `xb` and `db` hold 32 f32s and `i < 4`, so the loads read
            // `[8 * i..8 * i + 8]` of each, in bounds.
            let (xv, dv) = unsafe {
                (
                    _mm256_loadu_ps(xb.as_ptr().add(8 * i)),
                    _mm256_loadu_ps(db.as_ptr().add(8 * i)),
                )
            };
            let g = match K {
                Q4_0 | Q5_0 => {
                    let (half, top) = if K == Q4_0 { (8.5, 16.0) } else { (16.5, 32.0) };
                    let v = _mm256_add_ps(_mm256_mul_ps(xv, vid), c(half));
                    _mm256_and_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(v, c(top)), dv)
                }
                _ => {
                    nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(xv, xv));
                    dv
                }
            };
            // SAFETY: `ob` holds 32 f32 slots (`MaybeUninit<f32>` has f32's layout) and
            // `i < 4`, so the store writes `out[8 * i..8 * i + 8]`, in bounds.
            unsafe { _mm256_storeu_ps(out.add(8 * i), g) };
        }
        // Q4_1/Q5_1: a block holding a NaN goes to the portable kernel (see `quantize`).
        if _mm256_movemask_ps(nan) != 0 {
            block32::backward_portable(kind_of(K), xb, db, ob);
        }
    }
}

const Q8_0: u8 = 0;
const Q4_0: u8 = 1;
const Q4_1: u8 = 2;
const Q5_0: u8 = 3;
const Q5_1: u8 = 4;

fn kind_of(k: u8) -> Kind32 {
    match k {
        Q8_0 => Kind32::Q8_0,
        Q4_0 => Kind32::Q4_0,
        Q4_1 => Kind32::Q4_1,
        Q5_0 => Kind32::Q5_0,
        _ => Kind32::Q5_1,
    }
}

/// Blocks whose statistics are reduced together, one block per lane.
const LANES: usize = 8;

#[target_feature(enable = "avx2,f16c,fma")]
fn run<const K: u8>(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    assert!(x.len() == y.len() && x.len().is_multiple_of(QK));
    let (xg, xt) = x.as_chunks::<{ LANES * QK }>();
    let (yg, yt) = y.as_chunks_mut::<{ LANES * QK }>();
    // Software-pipelined: the statistics and scales of group k + 1 (a reduction, then
    // dependent divisions and f16 roundings) are computed before the outputs of group k,
    // so that their latency overlaps independent work instead of stalling every group.
    let mut next = xg.first().map(|x0| stats::<K>(x0));
    for (k, (xs, ys)) in xg.iter().zip(yg).enumerate() {
        let cur = next;
        next = xg.get(k + 1).map(|x1| stats::<K>(x1));
        match cur {
            Some(Some(st)) => quantize::<K>(xs, ys, &st),
            _ => block32::forward_portable(kind_of(K), xs, ys),
        }
    }
    // The last blocks (fewer than 8).
    block32::forward_portable(kind_of(K), xt, yt);
}

/// [`run`] with the output loop in AVX-512 registers ([`quantize512`]).
#[target_feature(enable = "avx2,f16c,fma,avx512f")]
fn run512<const K: u8>(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    assert!(x.len() == y.len() && x.len().is_multiple_of(QK));
    let (xg, xt) = x.as_chunks::<{ LANES * QK }>();
    let (yg, yt) = y.as_chunks_mut::<{ LANES * QK }>();
    let mut next = xg.first().map(|x0| stats::<K>(x0));
    for (k, (xs, ys)) in xg.iter().zip(yg).enumerate() {
        let cur = next;
        next = xg.get(k + 1).map(|x1| stats::<K>(x1));
        match cur {
            Some(Some(st)) => quantize512::<K>(xs, ys, &st),
            _ => block32::forward_portable(kind_of(K), xs, ys),
        }
    }
    block32::forward_portable(kind_of(K), xt, yt);
}

/// `f16::from_f32(v).to_f32()` lane by lane, by F16C (`vcvtps2ph`, nearest even).
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn f16r(v: __m256) -> __m256 {
    _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
}

/// The 32 inputs of block `b` of the group, as 4 vectors.
#[target_feature(enable = "avx2")]
#[inline]
fn load(xs: &[f32; LANES * QK], b: usize) -> [__m256; 4] {
    assert!(b < LANES);
    let p = xs[b * QK..].as_ptr();
    // SAFETY: `b < 8` (asserted) and `xs` holds 8 blocks of 32 f32s, so `p[0..32]` is in
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

/// The constants of 8 blocks, one block per lane, and which of them the fast path takes.
struct Stats {
    /// `1 / d` (f32).
    id: [f32; LANES],
    /// `d` rounded to f16 (as f32).
    dq: [f32; LANES],
    /// The block minimum (Q4_1, Q5_1; else 0) and its f16 rounding.
    mn: [f32; LANES],
    mq: [f32; LANES],
    /// Bit `b` set: block `b` takes the fast path (see the module docs).
    ok: i32,
}

/// `x` as its f32 bits.
#[target_feature(enable = "avx2")]
#[inline]
fn bits(v: __m256) -> __m256i {
    _mm256_castps_si256(v)
}

/// The statistics and scales of 8 blocks (see [`Stats`]); `None` when one of Q8_0's, Q4_0's
/// or Q5_0's blocks holds a NaN (the portable kernel then takes the group). Q4_1 and Q5_1
/// leave the NaN check to [`quantize`] and [`grad`], which load every input anyway.
///
/// Q8_0 reduces the bits of `|x|` with a signed integer maximum: for non-negative floats
/// the integer order is the float order, and a NaN's bits exceed infinity's. Q4_0 and Q5_0
/// reduce the bits of `x` with a signed maximum (the largest non-negative value, or a
/// positive NaN, when there is one) and an unsigned maximum (the negative value of largest
/// magnitude, or a negative NaN, when there is one): the two extremes `signed_abs_max`
/// compares, NaN check included. Q4_1 and Q5_1 take the float minimum and maximum and an
/// unordered comparison.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn stats<const K: u8>(xs: &[f32; LANES * QK]) -> Option<Stats> {
    let zero = _mm256_setzero_ps();
    let sign = _mm256_set1_ps(-0.0);
    let all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    let cast = _mm256_castsi256_ps;
    let smax = |a: __m256, b: __m256| cast(_mm256_max_epi32(bits(a), bits(b)));
    let umax = |a: __m256, b: __m256| cast(_mm256_max_epu32(bits(a), bits(b)));
    let inf = _mm256_set1_epi32(f32::INFINITY.to_bits() as i32);
    // Per lane (block): the scale `d`, the minimum, and whether the fast path takes it.
    let (d, min, ok) = match K {
        Q8_0 => {
            let (m, _) = reduce8x2(
                |b| {
                    let v = load(xs, b);
                    let a = |i: usize| _mm256_andnot_ps(sign, v[i]);
                    let m = smax(smax(a(0), a(1)), smax(a(2), a(3)));
                    (m, m)
                },
                smax,
                smax,
            );
            if _mm256_movemask_epi8(_mm256_cmpgt_epi32(bits(m), inf)) != 0 {
                return None;
            }
            (_mm256_div_ps(m, _mm256_set1_ps(127.0)), zero, all)
        }
        Q4_0 | Q5_0 => {
            // `hs`: the largest value as a signed integer (a non-negative float when the
            // block has one); `hu`: the largest as an unsigned integer (a negative float
            // when the block has one).
            let (hs, hu) = reduce8x2(
                |b| {
                    let v = load(xs, b);
                    (
                        smax(smax(v[0], v[1]), smax(v[2], v[3])),
                        umax(umax(v[0], v[1]), umax(v[2], v[3])),
                    )
                },
                smax,
                umax,
            );
            // A positive NaN is the only value above +inf as a signed integer, a negative
            // NaN the only one above -inf as an unsigned integer (`hu >= -inf`, unsigned,
            // and `hu != -inf`).
            let neg_inf = _mm256_set1_epi32(f32::NEG_INFINITY.to_bits() as i32);
            let neg_nan = _mm256_andnot_si256(
                _mm256_cmpeq_epi32(bits(hu), neg_inf),
                _mm256_cmpeq_epi32(_mm256_max_epu32(bits(hu), neg_inf), bits(hu)),
            );
            let nan = _mm256_or_si256(_mm256_cmpgt_epi32(bits(hs), inf), neg_nan);
            if _mm256_movemask_epi8(nan) != 0 {
                return None;
            }
            // `signed_abs_max`'s largest value and largest negated value, from 0: `hs`
            // when non-negative (a negative `hs` means no non-negative value), `-hu` when
            // negative (a non-negative `hu` means no negative value).
            let h = _mm256_and_ps(
                hs,
                cast(_mm256_cmpgt_epi32(bits(hs), _mm256_set1_epi32(-1))),
            );
            let n = _mm256_and_ps(
                _mm256_xor_ps(hu, sign),
                cast(_mm256_cmpgt_epi32(_mm256_setzero_si256(), bits(hu))),
            );
            let amax = _mm256_blendv_ps(h, n, _mm256_cmp_ps::<_CMP_LT_OQ>(h, n));
            let is_h = _mm256_cmp_ps::<_CMP_EQ_OQ>(h, amax);
            // A block holding both `+amax` and `-amax` takes the portable kernel (which
            // looks for the first of them).
            let tie = _mm256_and_ps(is_h, _mm256_cmp_ps::<_CMP_EQ_OQ>(n, amax));
            let max = _mm256_blendv_ps(_mm256_xor_ps(n, sign), h, is_h);
            let div = if K == Q4_0 { -8.0 } else { -16.0 };
            (
                _mm256_div_ps(max, _mm256_set1_ps(div)),
                zero,
                _mm256_andnot_ps(tie, all),
            )
        }
        _ => {
            // No NaN check here: `quantize` looks for NaNs in the inputs it loads anyway and
            // hands such a block to the portable kernel (whatever these lanes then hold).
            let (mn, mx) = reduce8x2(
                |b| {
                    let v = load(xs, b);
                    (
                        _mm256_min_ps(_mm256_min_ps(v[0], v[1]), _mm256_min_ps(v[2], v[3])),
                        _mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3])),
                    )
                },
                |a, b| _mm256_min_ps(a, b),
                |a, b| _mm256_max_ps(a, b),
            );
            // A zero minimum or maximum takes the portable kernel (its sign is candle's
            // fold's, see `zero_sign`).
            let zeros = _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_EQ_OQ>(mx, zero),
                _mm256_cmp_ps::<_CMP_EQ_OQ>(mn, zero),
            );
            let div = if K == Q4_1 { 15.0 } else { 31.0 };
            (
                _mm256_div_ps(_mm256_sub_ps(mx, mn), _mm256_set1_ps(div)),
                mn,
                _mm256_andnot_ps(zeros, all),
            )
        }
    };
    // `d.is_normal()`: MIN_POSITIVE <= |d| < inf (false for NaN).
    let ad = _mm256_andnot_ps(sign, d);
    let normal = _mm256_and_ps(
        _mm256_cmp_ps::<_CMP_GE_OQ>(ad, _mm256_set1_ps(f32::MIN_POSITIVE)),
        _mm256_cmp_ps::<_CMP_LT_OQ>(ad, _mm256_set1_ps(f32::INFINITY)),
    );
    let lanes = |v: __m256| {
        let mut a = [0f32; LANES];
        // SAFETY: `a` holds 8 f32s, the unaligned store writes `a[0..8]`.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        a
    };
    let dq = f16r(d);
    // Q8_0's fused output needs `d > 0` after the f16 rounding (see `quantize`).
    let ok = if K == Q8_0 {
        _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_GT_OQ>(dq, zero))
    } else {
        ok
    };
    Some(Stats {
        id: lanes(_mm256_div_ps(_mm256_set1_ps(1.0), d)),
        dq: lanes(dq),
        mn: lanes(min),
        mq: lanes(f16r(min)),
        ok: _mm256_movemask_ps(_mm256_and_ps(ok, normal)),
    })
}

/// Fake-quantizes 8 blocks from their [`Stats`], each (still in L1) from broadcasts of its
/// lane; a block outside the fast path goes to the portable kernel.
#[target_feature(enable = "avx2,f16c,fma")]
#[inline]
fn quantize<const K: u8>(
    xs: &[f32; LANES * QK],
    ys: &mut [MaybeUninit<f32>; LANES * QK],
    st: &Stats,
) {
    let zero = _mm256_setzero_ps();
    let trunc = |a: __m256| _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(a);
    let c = _mm256_set1_ps;
    for b in 0..LANES {
        let (xb, yb) = (
            &xs.as_chunks::<QK>().0[b],
            &mut ys.as_chunks_mut::<QK>().0[b],
        );
        if st.ok & (1 << b) == 0 {
            block32::forward_portable(kind_of(K), xb, yb);
            continue;
        }
        let (vid, vd, vm, vmin) = (c(st.id[b]), c(st.dq[b]), c(st.mq[b]), c(st.mn[b]));
        let out = yb.as_mut_ptr().cast::<f32>();
        let mut nan = zero;
        for (i, xv) in load(xs, b).into_iter().enumerate() {
            let y = match K {
                Q8_0 => {
                    // round(q) half away from zero: trunc(q) + trunc(2 * frac), the
                    // integral part made +0.0 first (`round(-0.3)` saturates to the
                    // integer 0).
                    let q = _mm256_mul_ps(xv, vid);
                    let t = trunc(q);
                    let f = _mm256_sub_ps(q, t);
                    let r = _mm256_add_ps(t, trunc(_mm256_add_ps(f, f)));
                    // `r * d + 0.0` with one rounding: the product of a code (8 bits) and
                    // an f16 scale (11) is exact, so this is `r * d` except that a code of
                    // -0.0 (from `round(-0.3)`, the integer 0) gives +0.0, as the
                    // integer does (the fast path has `d > 0`).
                    _mm256_fmadd_ps(r, vd, zero)
                }
                Q4_0 | Q5_0 => {
                    let (off, half, hi) = if K == Q4_0 {
                        (8.0, 8.5, 15.0)
                    } else {
                        (16.0, 16.5, 31.0)
                    };
                    let q = _mm256_add_ps(_mm256_mul_ps(xv, vid), c(half));
                    let code = _mm256_min_ps(trunc(q), c(hi));
                    _mm256_mul_ps(_mm256_sub_ps(code, c(off)), vd)
                }
                _ => {
                    nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(xv, xv));
                    // `x <= max`, so `(x - min) * id + 0.5 <= 15.5` (31.5) up to a few ulps:
                    // candle's `min(15)` (Q4_1) never applies in the fast path.
                    let q = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(xv, vmin), vid), c(0.5));
                    let code = trunc(q);
                    // `code * d + m` with one rounding: the product of a code (5 bits) and
                    // an f16 scale (11) is exact, so the fused sum rounds as the sum does.
                    _mm256_fmadd_ps(code, vd, vm)
                }
            };
            // SAFETY: `yb` holds 32 f32 slots (`MaybeUninit<f32>` has f32's layout) and
            // `i < 4`, so the store writes `out[8 * i..8 * i + 8]`, in bounds.
            unsafe { _mm256_storeu_ps(out.add(8 * i), y) };
        }
        // Q4_1/Q5_1: a block holding a NaN (its statistics are then meaningless) is
        // recomputed by the portable kernel, over what was just written.
        if _mm256_movemask_ps(nan) != 0 {
            block32::forward_portable(kind_of(K), xb, yb);
        }
    }
}

/// [`quantize`] in AVX-512 registers (16 lanes, two per block): the same operations in
/// the same order, lane for lane.
#[target_feature(enable = "avx2,f16c,fma,avx512f")]
#[inline]
fn quantize512<const K: u8>(
    xs: &[f32; LANES * QK],
    ys: &mut [MaybeUninit<f32>; LANES * QK],
    st: &Stats,
) {
    let zero = _mm512_setzero_ps();
    let trunc = |a: __m512| _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(a);
    let c = _mm512_set1_ps;
    for b in 0..LANES {
        let (xb, yb) = (
            &xs.as_chunks::<QK>().0[b],
            &mut ys.as_chunks_mut::<QK>().0[b],
        );
        if st.ok & (1 << b) == 0 {
            block32::forward_portable(kind_of(K), xb, yb);
            continue;
        }
        let (vid, vd, vm, vmin) = (c(st.id[b]), c(st.dq[b]), c(st.mq[b]), c(st.mn[b]));
        let out = yb.as_mut_ptr().cast::<f32>();
        let mut nan: __mmask16 = 0;
        for (i, h) in xb.as_chunks::<16>().0.iter().enumerate() {
            // SAFETY: `h` holds 16 f32s; the unaligned load reads all 16.
            let xv = unsafe { _mm512_loadu_ps(h.as_ptr()) };
            let y = match K {
                Q8_0 => {
                    let q = _mm512_mul_ps(xv, vid);
                    let t = trunc(q);
                    let f = _mm512_sub_ps(q, t);
                    let r = _mm512_add_ps(t, trunc(_mm512_add_ps(f, f)));
                    _mm512_fmadd_ps(r, vd, zero)
                }
                Q4_0 | Q5_0 => {
                    let (off, half, hi) = if K == Q4_0 {
                        (8.0, 8.5, 15.0)
                    } else {
                        (16.0, 16.5, 31.0)
                    };
                    let q = _mm512_add_ps(_mm512_mul_ps(xv, vid), c(half));
                    let code = _mm512_min_ps(trunc(q), c(hi));
                    _mm512_mul_ps(_mm512_sub_ps(code, c(off)), vd)
                }
                _ => {
                    nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(xv, xv);
                    let q = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(xv, vmin), vid), c(0.5));
                    let code = trunc(q);
                    _mm512_fmadd_ps(code, vd, vm)
                }
            };
            // SAFETY: `yb` holds 32 f32 slots (`MaybeUninit<f32>` has f32's layout) and
            // `i < 2`, so the store writes `out[16 * i..16 * i + 16]`, in bounds.
            unsafe { _mm512_storeu_ps(out.add(16 * i), y) };
        }
        if nan != 0 {
            block32::forward_portable(kind_of(K), xb, yb);
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    fn both(kind: Kind32, x: &[f32], wide: bool) -> Option<(Vec<u32>, Vec<u32>)> {
        let mut a = vec![MaybeUninit::new(f32::NAN); x.len()];
        let mut b = vec![MaybeUninit::new(f32::NAN); x.len()];
        if !try_forward_at(kind, x, &mut a, wide) {
            return None;
        }
        block32::forward_portable(kind, x, &mut b);
        let bits = |v: &[MaybeUninit<f32>]| {
            v.iter()
                // SAFETY: both vectors were created initialised (NaN).
                .map(|e| unsafe { e.assume_init() }.to_bits())
                .collect()
        };
        Some((bits(&a), bits(&b)))
    }

    const KINDS: [Kind32; 5] = [
        Kind32::Q8_0,
        Kind32::Q4_0,
        Kind32::Q4_1,
        Kind32::Q5_0,
        Kind32::Q5_1,
    ];

    /// Random blocks at many magnitudes (normal, tiny, huge), ties of `x * id`, repeated
    /// extremes of either sign, zeros of both signs, NaN and infinities: the AVX2 kernel
    /// (with its AVX2 and its AVX-512 output loop) gives the portable kernel's bits.
    #[test]
    fn avx2_forward_matches_portable_bitwise() {
        let mut s: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut x = Vec::new();
        for scale in [
            1.0f32, 1e-3, 3.0e4, 7e4, 1e-38, 1e-41, 1e30, 3e38, 6.1e-5, 1e-7,
        ] {
            for _ in 0..64 {
                let mut b: Vec<f32> = (0..QK)
                    .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
                    .collect();
                match next() % 8 {
                    0 => {
                        // Integral grid: many exact .5 ties after scaling.
                        for v in &mut b {
                            *v = ((*v / scale * 16.0).round() / 16.0) * scale;
                        }
                    }
                    1 => {
                        let m = b[3].abs().max(1e-30);
                        b[7] = -m * 4.0;
                        b[20] = m * 4.0;
                    }
                    2 => b[(next() % 32) as usize] = if next() % 2 == 0 { 0.0 } else { -0.0 },
                    3 => b.iter_mut().for_each(|v| *v = -v.abs()),
                    4 => b.iter_mut().for_each(|v| *v = v.abs()),
                    _ => {}
                }
                x.extend(b);
            }
        }
        let mut special = vec![0.0f32; QK];
        x.extend(&special);
        special[5] = -0.0;
        x.extend(&special);
        special[9] = f32::NAN;
        x.extend(&special);
        special[9] = f32::INFINITY;
        x.extend(&special);
        special[2] = f32::NEG_INFINITY;
        x.extend(&special);
        // Negative NaNs (above -inf as unsigned integers), a positive NaN beside -inf and
        // a negative one beside +inf: the integer reductions must see every NaN.
        special[9] = -f32::NAN;
        x.extend(&special);
        special[2] = f32::NAN;
        special[9] = f32::NEG_INFINITY;
        x.extend(&special);
        special[2] = -f32::NAN;
        special[9] = f32::INFINITY;
        x.extend(&special);
        let mut ones = vec![1.0f32; QK];
        ones[17] = -f32::NAN;
        x.extend(&ones);
        ones[17] = f32::from_bits(0xffc0_0001);
        ones[3] = -2.0;
        x.extend(&ones);
        // Whole groups of 8 ordinary blocks after them, so that the fast path runs again.
        x.extend((0..8 * QK).map(|i| (i as f32 * 0.37).sin()));
        // Both output loops: AVX2 (`wide` false) and AVX-512 where the CPU has it.
        for (kind, wide) in KINDS.into_iter().flat_map(|k| [(k, false), (k, true)]) {
            let Some((a, b)) = both(kind, &x, wide) else {
                return;
            };
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                assert_eq!(p, q, "{kind:?} (wide {wide}) element {i} (x = {:e})", x[i]);
            }
        }
    }

    /// The AVX2 backward gives the portable backward's bits on the forward test's blocks
    /// (whole groups of 8 and a tail), with a distinct gradient per element.
    #[test]
    fn avx2_backward_matches_portable_bitwise() {
        let mut x: Vec<f32> = (0..40 * QK)
            .map(|i| ((i * 7919 % 1013) as f32 / 97.0 - 5.0) * if i % 3 == 0 { 1e-3 } else { 1.0 })
            .collect();
        // Blocks of the fast path's edges: `-max` (Q4_0/Q5_0 clamp it), `+max` beside it
        // (a tie), zero extremes, NaN, infinities, tiny scales.
        x[3 * QK + 5] = -10.0;
        x[4 * QK + 5] = -10.0;
        x[4 * QK + 6] = 10.0;
        x[5 * QK..6 * QK].iter_mut().for_each(|v| *v = v.abs());
        x[6 * QK + 1] = f32::NAN;
        x[9 * QK + 2] = f32::INFINITY;
        x[11 * QK..12 * QK].iter_mut().for_each(|v| *v *= 1e-40);
        x[17 * QK + 9] = -f32::NAN;
        // Clamped by Q4_0 and Q5_0 (the opposite extreme), in a fast-path group.
        x[26 * QK + 5] = -10.0;
        x[26 * QK + 6] = 9.9;
        let dy: Vec<f32> = (0..x.len()).map(|i| i as f32 + 0.5).collect();
        for kind in KINDS {
            let mut a = vec![MaybeUninit::new(f32::NAN); x.len()];
            let mut b = vec![MaybeUninit::new(f32::NAN); x.len()];
            if !try_backward(kind, &x, &dy, &mut a) {
                return;
            }
            block32::backward_portable(kind, &x, &dy, &mut b);
            for i in 0..x.len() {
                // SAFETY: both vectors were created initialised (NaN).
                let (p, q) = unsafe { (a[i].assume_init(), b[i].assume_init()) };
                assert_eq!(
                    p.to_bits(),
                    q.to_bits(),
                    "{kind:?} element {i} (x = {:e})",
                    x[i]
                );
            }
            if matches!(kind, Kind32::Q4_0 | Kind32::Q5_0) {
                // SAFETY: `a` was created initialised (NaN).
                assert_eq!(unsafe { a[26 * QK + 6].assume_init() }, 0.0, "{kind:?}");
            }
        }
    }

    /// F16C's nearest-even rounding is `f16::from_f32`'s, on a sweep of every 61st f32 bit
    /// pattern (all exponents: subnormal results, overflow to infinity, NaN) and on every
    /// f32 within 4 ulps of each f16 rounding boundary of the normal and subnormal range.
    #[test]
    fn f16c_rounding_is_half_crates() {
        if !(is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx2")) {
            return;
        }
        let check = |v: f32| {
            // SAFETY: F16C detected above (and AVX2 by the caller's check).
            let a = unsafe { _mm256_cvtss_f32(f16r(_mm256_set1_ps(v))) };
            let b = f16::from_f32(v).to_f32();
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{v:e}: {a:e} vs {b:e}"
            );
        };
        for bits in (0..=u32::MAX).step_by(61) {
            check(f32::from_bits(bits));
        }
        for h in 0..=u16::MAX {
            let (lo, hi) = (
                f16::from_bits(h).to_f32(),
                f16::from_bits(h.wrapping_add(1)).to_f32(),
            );
            if !lo.is_finite() || !hi.is_finite() || lo.is_sign_negative() != hi.is_sign_negative()
            {
                continue;
            }
            let mid = (lo as f64 + hi as f64) / 2.0;
            let m = mid as f32;
            for k in -4i32..=4 {
                check(f32::from_bits(m.to_bits().wrapping_add_signed(k)));
            }
        }
    }
}
