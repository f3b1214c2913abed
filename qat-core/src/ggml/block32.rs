//! The CPU kernels of the 32-element GGML block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1):
//! fake quantization, the straight-through mask and the raw block bytes, each bit-exact
//! with candle 0.11.1's `GgmlType::from_float` / `to_float` (`quantized/k_quants.rs`).
//!
//! Every expression mirrors candle's, operation for operation, in f32: the block statistic
//! (signed largest-|x| value, absolute maximum, or minimum and maximum), the scale `d`, its
//! f32 reciprocal `id` (0 for a zero scale), the scale rounded to f16 (nearest even) for
//! storage and dequantization, and the code: Q8_0 `round(x * id)` (half away from zero)
//! saturated to i8; Q4_0 `min(15, (x * id + 8.5) as u8)`; Q4_1 `min(15, ((x - min) * id +
//! 0.5) as u8)`; Q5_0 `min(31, (x * id + 16.5) as i8)` keeping 5 bits; Q5_1 `((x - min) *
//! id + 0.5) as u8` keeping 5 bits. Rust never contracts `a * b + c` into an FMA, so the
//! same f32 expressions give the same bits. The saturating casts (`as u8` / `as i8`: clamp,
//! truncate, NaN to 0) are restated as selects, `trunc` and `+ 0.0` on f32 so that the
//! loops vectorize; tests/ggml.rs checks them against candle on NaN, infinite, overflowing
//! and signed-zero blocks.
//!
//! An element's code is *clamped* when the quantizer's saturation or `min` changed the
//! truncated value, i.e. when the pre-truncation value `v` lies outside `(-1, hi + 1)`
//! (`hi` = 15 or 31; for Q8_0 when `round(x * id)` lies outside `[-128, 127]`); NaN counts
//! as clamped. The straight-through gradient is 0 there.

use std::mem::MaybeUninit;

use half::f16;
use half::slice::HalfFloatSliceExt;
use multiversion::multiversion;

/// Elements per block.
pub(crate) const QK: usize = 32;

/// The five 32-element types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind32 {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
}

/// One quantized block's constants, computed from its 32 inputs.
trait Block: Sized {
    /// Bytes of the block as GGUF stores it.
    const BYTES: usize;
    /// The block's scale `d` and minimum (0 for the symmetric types), unrounded.
    fn stats(xs: &[f32]) -> (f32, f32);
    /// The block from its unrounded scale and minimum and their f16 roundings.
    fn from_parts(d: f32, min: f32, d16: f16, m16: f16) -> Self;
    fn new(xs: &[f32]) -> Self {
        let (d, min) = Self::stats(xs);
        Self::from_parts(d, min, f16::from_f32(d), f16::from_f32(min))
    }
    /// dequantize(quantize(x)).
    fn value(&self, x: f32) -> f32;
    /// Whether `x`'s code was not clamped.
    fn in_range(&self, x: f32) -> bool;
    /// The block's bytes (`out.len() == BYTES`).
    fn write(&self, xs: &[f32], out: &mut [u8]);
}

/// The largest |x| of the block, NaNs ignored, 0 for an empty or all-NaN block: candle's
/// `if amax < x.abs() { amax = x.abs() }` (and `amax.max(x.abs())`, the same value). Kept
/// in 8 lanes so that it vectorizes; the maximum does not depend on the order.
#[inline(always)]
fn abs_max(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for c in xs.as_chunks::<8>().0 {
        for l in 0..8 {
            let a = c[l].abs();
            acc[l] = if acc[l] < a { a } else { acc[l] };
        }
    }
    acc.iter().fold(0f32, |m, &a| if m < a { a } else { m })
}

/// candle's `max` of Q4_0/Q5_0 (32 values) and Q8_K (256): the first element whose |x| is
/// the block's largest (its sign kept), `+0.0` when that is 0. From the block's minimum
/// and maximum (vectorized); only a block holding both `+amax` and `-amax` looks for the
/// first of them (candle's strict `<` keeps the first).
#[inline(always)]
pub(crate) fn signed_abs_max(xs: &[f32]) -> f32 {
    // The largest positive value and the largest negated value, from 0, NaNs ignored (the
    // same select as `abs_max`, which compiles to `maxps`).
    let (mut pos, mut neg) = ([0f32; 8], [0f32; 8]);
    for c in xs.as_chunks::<8>().0 {
        for l in 0..8 {
            pos[l] = if pos[l] < c[l] { c[l] } else { pos[l] };
            neg[l] = if neg[l] < -c[l] { -c[l] } else { neg[l] };
        }
    }
    let hi = pos.iter().fold(0f32, |m, &a| if m < a { a } else { m });
    let neg = neg.iter().fold(0f32, |m, &a| if m < a { a } else { m });
    let amax = if hi < neg { neg } else { hi };
    if amax == 0.0 {
        0.0
    } else if hi == amax && neg == amax {
        xs.iter().copied().find(|x| x.abs() == amax).unwrap_or(0.0)
    } else if hi == amax {
        hi
    } else {
        -neg
    }
}

/// The minimum and maximum of the block, NaNs ignored (+inf / -inf for an all-NaN block),
/// in 8 lanes; the sign of a zero result is unspecified.
#[inline(always)]
fn raw_min_max(xs: &[f32]) -> (f32, f32) {
    let mut lo = [f32::INFINITY; 8];
    let mut hi = [f32::NEG_INFINITY; 8];
    for c in xs.as_chunks::<8>().0 {
        for l in 0..8 {
            lo[l] = lo[l].min(c[l]);
            hi[l] = hi[l].max(c[l]);
        }
    }
    let min = lo
        .iter()
        .fold(f32::INFINITY, |m, &v| if v < m { v } else { m });
    let max = hi
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    (min, max)
}

/// candle's `min` and `max` of Q4_1/Q5_1 (`f32::min(x, min)` from +inf, `f32::max(x, max)`
/// from -inf: NaNs ignored). Signed zeros: see [`zero_sign`].
#[inline(always)]
fn min_max(xs: &[f32]) -> (f32, f32) {
    let (min, max) = raw_min_max(xs);
    min_max_signed_zero(min, max, xs)
}

/// The block's minimum and maximum (NaNs ignored, zero signs unspecified) with the zero
/// signs candle's fold leaves ([`zero_sign`]).
#[inline(always)]
pub(crate) fn min_max_signed_zero(min: f32, max: f32, xs: &[f32]) -> (f32, f32) {
    (zero_sign(min, xs, true), zero_sign(max, xs, false))
}

/// The sign candle's compiled `f32::min` / `f32::max` fold leaves on a zero result (not a
/// value question, `-0.0 == 0.0`, but the f16 bytes of Q4_1/Q5_1's stored minimum differ):
/// the last zero of the block, as measured against candle 0.11.1 on x86-64 (tests/ggml.rs,
/// the signed-zero blocks), where `f32::min(x, acc)` returns its second operand on equal
/// inputs.
#[inline(always)]
fn zero_sign(v: f32, xs: &[f32], _is_min: bool) -> f32 {
    if v != 0.0 {
        return v;
    }
    xs.iter().rev().copied().find(|&x| x == 0.0).unwrap_or(v)
}

// Codes are computed as integral f32 values, in the float domain, so that the loops
// vectorize: Rust's saturating float-to-int casts are scalarized in vector code, and a
// clamped, truncated f32 is the same integer.

/// candle's `(v as u8).min(hi)` (`as` saturating, NaN to 0), for `hi <= 255`.
#[inline(always)]
fn trunc_u8_min(v: f32, hi: f32) -> f32 {
    let a = if v >= 0.0 { v } else { 0.0 };
    // `+ 0.0` turns a -0.0 code into the +0.0 an integer converts to.
    (if a < hi { a } else { hi }).trunc() + 0.0
}

/// candle's `v as i8` (saturating, NaN to 0).
#[inline(always)]
pub(crate) fn sat_i8(v: f32) -> f32 {
    let a = if v < 127.0 { v } else { 127.0 };
    let a = if a > -128.0 { a } else { -128.0 };
    // NaN fell through both selects to -128; the cast gives 0.
    // `+ 0.0`: a code of -0.0 (from `round(-0.3)`) is the integer 0, i.e. +0.0.
    (if v.is_nan() { 0.0 } else { a }).trunc() + 0.0
}

/// The low 5 bits of an integral `t` in `-128..=255` (two's complement), as `t & 0x1F`.
#[inline(always)]
fn low5(t: f32) -> f32 {
    t - 32.0 * (t * (1.0 / 32.0)).floor()
}

#[inline(always)]
fn inv(d: f32) -> f32 {
    if d != 0f32 {
        1. / d
    } else {
        0.
    }
}

#[inline(always)]
fn put_f16(out: &mut [u8], v: f16) {
    out[..2].copy_from_slice(&v.to_le_bytes());
}

/// Q8_0: `d = amax / 127`, codes `round(x * id)` saturated to i8.
struct Q8_0 {
    id: f32,
    d16: f16,
    d: f32,
}

impl Block for Q8_0 {
    const BYTES: usize = 34;

    #[inline(always)]
    fn stats(xs: &[f32]) -> (f32, f32) {
        (abs_max(xs) / ((1 << 7) - 1) as f32, 0.0)
    }

    #[inline(always)]
    fn from_parts(d: f32, _: f32, d16: f16, _: f16) -> Self {
        Q8_0 {
            id: inv(d),
            d16,
            d: d16.to_f32(),
        }
    }

    #[inline(always)]
    fn value(&self, x: f32) -> f32 {
        sat_i8(f32::round(x * self.id)) * self.d
    }

    #[inline(always)]
    fn in_range(&self, x: f32) -> bool {
        let r = f32::round(x * self.id);
        (-128.0..=127.0).contains(&r)
    }

    fn write(&self, xs: &[f32], out: &mut [u8]) {
        put_f16(out, self.d16);
        for (o, &x) in out[2..].iter_mut().zip(xs) {
            *o = sat_i8(f32::round(x * self.id)) as i8 as u8;
        }
    }
}

/// Q4_0: `d = max / -8` (max the signed largest-|x| value), codes `min(15, (x*id + 8.5) as
/// u8)`, value `(code - 8) * d`.
struct Q4_0 {
    id: f32,
    d16: f16,
    d: f32,
}

impl Q4_0 {
    /// candle's `u8::min(15, (x * id + 8.5) as u8)`.
    #[inline(always)]
    fn code(&self, x: f32) -> f32 {
        trunc_u8_min(x * self.id + 8.5, 15.0)
    }
}

impl Block for Q4_0 {
    const BYTES: usize = 18;

    #[inline(always)]
    fn stats(xs: &[f32]) -> (f32, f32) {
        (signed_abs_max(xs) / -8.0, 0.0)
    }

    #[inline(always)]
    fn from_parts(d: f32, _: f32, d16: f16, _: f16) -> Self {
        Q4_0 {
            id: inv(d),
            d16,
            d: d16.to_f32(),
        }
    }

    #[inline(always)]
    fn value(&self, x: f32) -> f32 {
        (self.code(x) - 8.0) * self.d
    }

    #[inline(always)]
    fn in_range(&self, x: f32) -> bool {
        let v = x * self.id + 8.5;
        v > -1.0 && v < 16.0
    }

    fn write(&self, xs: &[f32], out: &mut [u8]) {
        put_f16(out, self.d16);
        for j in 0..QK / 2 {
            out[2 + j] = self.code(xs[j]) as u8 | ((self.code(xs[j + QK / 2]) as u8) << 4);
        }
    }
}

/// Q4_1: `d = (max - min) / 15`, codes `min(15, ((x - min) * id + 0.5) as u8)`, value
/// `code * d + m` (d and m the f16 scale and minimum).
struct Q4_1 {
    min: f32,
    id: f32,
    d16: f16,
    m16: f16,
    d: f32,
    m: f32,
}

impl Q4_1 {
    /// candle's `u8::min(15, ((x - min) * id + 0.5) as u8)`.
    #[inline(always)]
    fn code(&self, x: f32) -> f32 {
        trunc_u8_min((x - self.min) * self.id + 0.5, 15.0)
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;

    #[inline(always)]
    fn stats(xs: &[f32]) -> (f32, f32) {
        let (min, max) = min_max(xs);
        ((max - min) / ((1 << 4) - 1) as f32, min)
    }

    #[inline(always)]
    fn from_parts(d: f32, min: f32, d16: f16, m16: f16) -> Self {
        Q4_1 {
            min,
            id: inv(d),
            d16,
            m16,
            d: d16.to_f32(),
            m: m16.to_f32(),
        }
    }

    #[inline(always)]
    fn value(&self, x: f32) -> f32 {
        self.code(x) * self.d + self.m
    }

    #[inline(always)]
    fn in_range(&self, x: f32) -> bool {
        let v = (x - self.min) * self.id + 0.5;
        v > -1.0 && v < 16.0
    }

    fn write(&self, xs: &[f32], out: &mut [u8]) {
        put_f16(out, self.d16);
        put_f16(&mut out[2..], self.m16);
        for j in 0..QK / 2 {
            out[4 + j] = self.code(xs[j]) as u8 | ((self.code(xs[j + QK / 2]) as u8) << 4);
        }
    }
}

/// Packs 32 five-bit codes as Q5_0/Q5_1 store them: `qh` (bit 4 of each code, little
/// endian u32) then `qs` (low nibbles, element `j` and `j + 16` in one byte).
#[inline(always)]
fn write_q5(codes: impl Fn(usize) -> f32, out: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let (c0, c1) = (codes(j) as u8, codes(j + QK / 2) as u8);
        out[4 + j] = (c0 & 0x0F) | ((c1 & 0x0F) << 4);
        qh |= ((c0 as u32 & 0x10) >> 4) << j;
        qh |= ((c1 as u32 & 0x10) >> 4) << (j + QK / 2);
    }
    out[..4].copy_from_slice(&qh.to_le_bytes());
}

/// Q5_0: `d = max / -16`, codes `min(31, (x * id + 16.5) as i8)` (5 bits kept), value
/// `(code - 16) * d`.
struct Q5_0 {
    id: f32,
    d16: f16,
    d: f32,
}

impl Q5_0 {
    /// candle's `((x * id + 16.5) as i8).min(31) as u8`, to the 5 bits it stores (a
    /// negative code, possible only with an infinite `id`, wraps as candle's does).
    #[inline(always)]
    fn code(&self, x: f32) -> f32 {
        let t = sat_i8(x * self.id + 16.5);
        low5(if t < 31.0 { t } else { 31.0 })
    }
}

impl Block for Q5_0 {
    const BYTES: usize = 22;

    #[inline(always)]
    fn stats(xs: &[f32]) -> (f32, f32) {
        (signed_abs_max(xs) / -16., 0.0)
    }

    #[inline(always)]
    fn from_parts(d: f32, _: f32, d16: f16, _: f16) -> Self {
        Q5_0 {
            id: inv(d),
            d16,
            d: d16.to_f32(),
        }
    }

    #[inline(always)]
    fn value(&self, x: f32) -> f32 {
        (self.code(x) - 16.0) * self.d
    }

    #[inline(always)]
    fn in_range(&self, x: f32) -> bool {
        let v = x * self.id + 16.5;
        v > -1.0 && v < 32.0
    }

    fn write(&self, xs: &[f32], out: &mut [u8]) {
        put_f16(out, self.d16);
        write_q5(|j| self.code(xs[j]), &mut out[2..]);
    }
}

/// Q5_1: `d = (max - min) / 31`, codes `((x - min) * id + 0.5) as u8` (5 bits kept), value
/// `code * d + m`.
struct Q5_1 {
    min: f32,
    id: f32,
    d16: f16,
    m16: f16,
    d: f32,
    m: f32,
}

impl Q5_1 {
    /// candle's `((x - min) * id + 0.5) as u8`, to the 5 bits it stores.
    #[inline(always)]
    fn code(&self, x: f32) -> f32 {
        low5(trunc_u8_min((x - self.min) * self.id + 0.5, 255.0))
    }
}

impl Block for Q5_1 {
    const BYTES: usize = 24;

    #[inline(always)]
    fn stats(xs: &[f32]) -> (f32, f32) {
        let (min, max) = min_max(xs);
        ((max - min) / ((1 << 5) - 1) as f32, min)
    }

    #[inline(always)]
    fn from_parts(d: f32, min: f32, d16: f16, m16: f16) -> Self {
        Q5_1 {
            min,
            id: inv(d),
            d16,
            m16,
            d: d16.to_f32(),
            m: m16.to_f32(),
        }
    }

    #[inline(always)]
    fn value(&self, x: f32) -> f32 {
        self.code(x) * self.d + self.m
    }

    #[inline(always)]
    fn in_range(&self, x: f32) -> bool {
        let v = (x - self.min) * self.id + 0.5;
        v > -1.0 && v < 32.0
    }

    fn write(&self, xs: &[f32], out: &mut [u8]) {
        put_f16(out, self.d16);
        put_f16(&mut out[2..], self.m16);
        write_q5(|j| self.code(xs[j]), &mut out[4..]);
    }
}

/// Blocks per group: the scales of a group are rounded to f16 in one slice conversion
/// (one feature check, F16C 8 at a time) between the statistics pass and the element pass;
/// the group's inputs stay in L1 between the two.
const GROUP: usize = 64;

/// Runs `f(block, xs, offset)` for every block of `x`, the blocks built group by group.
#[inline(always)]
fn for_blocks<B: Block>(x: &[f32], mut f: impl FnMut(&B, &[f32], usize)) {
    let (mut d, mut min) = ([0f32; GROUP], [0f32; GROUP]);
    let (mut d16, mut m16) = ([f16::ZERO; GROUP], [f16::ZERO; GROUP]);
    for (g, xg) in x.chunks(GROUP * QK).enumerate() {
        let nb = xg.len() / QK;
        for (b, xb) in xg.as_chunks::<QK>().0.iter().enumerate() {
            // `black_box` hides the blocks' stride: vectorizing this loop across blocks
            // (8 strided gathers per vector) is slower than within each block.
            (d[b], min[b]) = B::stats(std::hint::black_box(xb));
        }
        d16[..nb].convert_from_f32_slice(&d[..nb]);
        m16[..nb].convert_from_f32_slice(&min[..nb]);
        for (b, xb) in xg.chunks_exact(QK).enumerate() {
            let block = B::from_parts(d[b], min[b], d16[b], m16[b]);
            f(&block, xb, (g * GROUP + b) * QK);
        }
    }
}

#[inline(always)]
fn fwd<B: Block>(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    for_blocks::<B>(x, |b, xb, off| {
        for (o, &v) in y[off..off + QK].iter_mut().zip(xb) {
            o.write(b.value(v));
        }
    });
}

#[inline(always)]
fn bwd<B: Block>(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
    for_blocks::<B>(x, |b, xb, off| {
        let r = off..off + QK;
        for ((o, &v), &d) in dx[r.clone()].iter_mut().zip(xb).zip(&dy[r]) {
            o.write(if b.in_range(v) { d } else { 0.0 });
        }
    });
}

#[inline(always)]
fn bytes<B: Block>(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(B::BYTES)) {
        B::new(xb).write(xb, ob);
    }
}

/// `y = dequantize(quantize(x))`; `x.len()` a multiple of 32 (whole blocks), `y` as long.
/// The explicit AVX2 kernel where the CPU has it, else the portable one.
pub(crate) fn forward(kind: Kind32, x: &[f32], y: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if super::block32_avx2::try_forward(kind, x, y) {
        return;
    }
    forward_portable(kind, x, y)
}

/// The portable forward, the reference of the explicit SIMD kernels (same contract as
/// [`forward`]).
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
pub(crate) fn forward_portable(kind: Kind32, x: &[f32], y: &mut [MaybeUninit<f32>]) {
    match kind {
        Kind32::Q8_0 => fwd::<Q8_0>(x, y),
        Kind32::Q4_0 => fwd::<Q4_0>(x, y),
        Kind32::Q4_1 => fwd::<Q4_1>(x, y),
        Kind32::Q5_0 => fwd::<Q5_0>(x, y),
        Kind32::Q5_1 => fwd::<Q5_1>(x, y),
    }
}

/// The straight-through backward: `dx = dy` where the code was not clamped, else 0;
/// `x.len()` a multiple of 32, `dy` and `dx` as long. The explicit AVX2 kernel where the
/// CPU has it, else the portable one.
pub(crate) fn backward(kind: Kind32, x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if super::block32_avx2::try_backward(kind, x, dy, dx) {
        return;
    }
    backward_portable(kind, x, dy, dx)
}

/// The portable backward, the reference of the explicit SIMD kernel (same contract as
/// [`backward`]).
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
pub(crate) fn backward_portable(kind: Kind32, x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
    match kind {
        Kind32::Q8_0 => bwd::<Q8_0>(x, dy, dx),
        Kind32::Q4_0 => bwd::<Q4_0>(x, dy, dx),
        Kind32::Q4_1 => bwd::<Q4_1>(x, dy, dx),
        Kind32::Q5_0 => bwd::<Q5_0>(x, dy, dx),
        Kind32::Q5_1 => bwd::<Q5_1>(x, dy, dx),
    }
}

/// Bytes of one block of `kind`.
pub(crate) fn block_bytes(kind: Kind32) -> usize {
    match kind {
        Kind32::Q8_0 => Q8_0::BYTES,
        Kind32::Q4_0 => Q4_0::BYTES,
        Kind32::Q4_1 => Q4_1::BYTES,
        Kind32::Q5_0 => Q5_0::BYTES,
        Kind32::Q5_1 => Q5_1::BYTES,
    }
}

/// The GGML blocks of `x` (`x.len() / 32` blocks of [`block_bytes`] each, in order).
pub(crate) fn quantize(kind: Kind32, x: &[f32], out: &mut [u8]) {
    match kind {
        Kind32::Q8_0 => bytes::<Q8_0>(x, out),
        Kind32::Q4_0 => bytes::<Q4_0>(x, out),
        Kind32::Q4_1 => bytes::<Q4_1>(x, out),
        Kind32::Q5_0 => bytes::<Q5_0>(x, out),
        Kind32::Q5_1 => bytes::<Q5_1>(x, out),
    }
}
