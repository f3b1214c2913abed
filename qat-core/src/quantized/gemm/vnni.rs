//! The AVX-512 VNNI kernels: `vpdpbusd` multiplies 4 u8 activation codes by 4 i8 weight
//! codes and adds the 4 products to an i32 lane, exactly for any codes (no i16 step to
//! saturate), so one kernel serves every activation range.
//!
//! Tiles of up to 8 weight rows x 32 positions (two 64-byte vectors of 16 positions x one
//! k-group, 16 accumulators), walking k in blocks of `K_BLOCK` k-groups like the AVX2
//! kernels; the last columns of a row are stored under a mask. [`dot`] serves the dot
//! products of [`super::gemv`], 64 codes per `vpdpbusd`.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Fused, PackedWeight, Panel, KG, K_BLOCK};

/// Weight rows per tile.
const MR: usize = 8;
/// Positions per vector (16 k-groups of 4 codes: 64 bytes).
const LANES: usize = 16;

/// One tile's operands (raw pointers into the panel, weights and output).
#[derive(Clone, Copy)]
struct Tile {
    /// First weight row of the tile, at the block's first k-group.
    w: *const i8,
    /// Weight row stride, in codes.
    kp: usize,
    /// The tile's first position in the block's first k-group.
    act: *const u8,
    /// Bytes from one k-group to the next.
    act_stride: usize,
    kgroups: usize,
    /// `x_zp * row_sum` of the tile's rows.
    corr: *const i32,
    /// Whether this is the first k-block: start from `-corr`, else from `out`.
    first: bool,
    /// The tile's first output.
    out: *mut i32,
    /// Output row stride.
    ldo: usize,
    /// Positions to store (the rest of the tile is padding).
    cols: usize,
}

/// Where a block's results go: i32 sums, or (one k-block only) codes requantized in the
/// tile.
pub(super) enum Dest<'a, 'f> {
    Sums(&'a mut [i32]),
    /// The output codes of the block's rows, `rows.len() * positions`, and the
    /// requantization of those rows (`mult` and `bias` indexed from the block's first row).
    Codes(&'a mut [u8], &'a Fused<'f>),
}

/// Every tile of a block of rows: k in blocks, positions in steps of 32 (the panel slice
/// stays in cache), weight rows inside.
///
/// # Safety
/// AVX-512F, AVX-512BW, AVX-512VL and AVX-512 VNNI must be available; `rows` must lie
/// inside `w`, `panel` must hold `w.kp / 4` k-groups (packed for `w.row_len`), `corr` and
/// the destination must hold at least `rows.len()` and `rows.len() * panel.positions`
/// values (`super::check_block` checks all of it); for `Dest::Codes`, `w.kp / 4 <=
/// K_BLOCK` and the `Fused` rows hold `rows.len()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn block(
    w: &PackedWeight,
    rows: Range<usize>,
    corr: &[i32],
    panel: &Panel,
    dest: Dest,
) {
    // SAFETY: the features are available and the operands fit (this function's contract,
    // checked by `check_block`). Then every access lies in bounds: a tile reads 64 bytes
    // per vector at k-group `k0 + g < kp / 4` and positions `p0 .. p0 + 16 * V`, where
    // `p0` is a multiple of 32 below `positions` and `V = 2` only when more than 16
    // positions remain: `p0 + 32 <= positions rounded up to 32 <= positions rounded up to 16
    // + 16 = stride` (`Panel::reset`), inside the panel's `kgroups * stride * 4` bytes; its
    // weight rows are `rows.start + r .. + mr <= rows.end <= w.rows` rows of `kp` codes,
    // read up to k-group `k0 + kn <= kp / 4`; its `corr` are `r .. r + mr <= rows.len()`;
    // its outputs are rows `r .. r + mr` of `positions` at columns `p0 .. p0 + cols <=
    // positions` (masked stores and loads touch only those).
    unsafe {
        let p = panel.positions;
        let nrows = rows.len();
        let act = panel.bytes().as_ptr();
        let act_stride = panel.stride * KG;
        let kgroups = w.kp / KG;
        let (sums, codes, fused): (*mut i32, *mut u8, Option<&Fused>) = match dest {
            Dest::Sums(o) => (o.as_mut_ptr(), std::ptr::null_mut(), None),
            Dest::Codes(o, f) => (std::ptr::null_mut(), o.as_mut_ptr(), Some(f)),
        };
        let mut k0 = 0;
        while k0 < kgroups {
            let kn = (kgroups - k0).min(K_BLOCK);
            let mut p0 = 0;
            while p0 < p {
                let cols = (p - p0).min(2 * LANES);
                let mut r = 0;
                while r < nrows {
                    let mr = (nrows - r).min(MR);
                    let t = Tile {
                        w: w.codes.as_ptr().add((rows.start + r) * w.kp + k0 * KG),
                        kp: w.kp,
                        act: act.add((k0 * panel.stride + p0) * KG),
                        act_stride,
                        kgroups: kn,
                        corr: corr.as_ptr().add(r),
                        first: k0 == 0,
                        out: sums.wrapping_add(r * p + p0),
                        ldo: p,
                        cols,
                    };
                    match fused {
                        Some(f) => {
                            let c = Codes {
                                out: codes.add(r * p + p0),
                                mult: f.mult.as_ptr().add(r),
                                bias: f.bias.as_ptr().add(r),
                                f,
                            };
                            if cols > LANES {
                                dispatch!(mr, tile_codes, 2, t, c);
                            } else {
                                dispatch!(mr, tile_codes, 1, t, c);
                            }
                        }
                        None if cols > LANES => dispatch!(mr, tile_sums, 2, t),
                        None => dispatch!(mr, tile_sums, 1, t),
                    }
                    r += mr;
                }
                p0 += 2 * LANES;
            }
            k0 += kn;
        }
    }
}

/// Calls `$f::<mr, $v>($args)` for a row count `mr` of 1 to 8.
macro_rules! dispatch {
    ($mr:expr, $f:ident, $v:literal, $($arg:expr),*) => {
        match $mr {
            8 => $f::<8, $v>($($arg),*),
            7 => $f::<7, $v>($($arg),*),
            6 => $f::<6, $v>($($arg),*),
            5 => $f::<5, $v>($($arg),*),
            4 => $f::<4, $v>($($arg),*),
            3 => $f::<3, $v>($($arg),*),
            2 => $f::<2, $v>($($arg),*),
            _ => $f::<1, $v>($($arg),*),
        }
    };
}
use dispatch;

/// `R` rows x `16 V` positions: per k-group, `V` activation vectors and one 4-code weight
/// broadcast per row, `R * V` `vpdpbusd`. Then, per row, the first k-block stores
/// `sums - corr` and later ones add the sums to what is stored; only the first `t.cols`
/// positions are touched.
///
/// # Safety
/// AVX-512F and VNNI must be available; `t.w` valid for reads of `R` rows (`t.kp` apart)
/// of `4 * t.kgroups` codes, `t.act` of `t.kgroups` k-groups (`t.act_stride` bytes apart)
/// of `64 V` bytes, `t.corr` of `R` values and `t.out.add(r * t.ldo)`, `r < R`, of reads
/// and writes of `t.cols <= 16 V` values.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_sums<const R: usize, const V: usize>(t: Tile) {
    // SAFETY: the features are available and `t`'s pointers cover every access (this
    // function's contract); the output accesses are masked to the first `t.cols` values
    // of each row.
    unsafe {
        let acc = sums::<R, V>(&t);
        for (r, acc) in acc.iter().enumerate() {
            let out = t.out.add(r * t.ldo);
            let c = _mm512_set1_epi32(*t.corr.add(r));
            for (v, &s) in acc.iter().enumerate() {
                let n = t.cols.saturating_sub(LANES * v).min(LANES);
                if n == 0 {
                    break;
                }
                let m: __mmask16 = if n == LANES { !0 } else { (1u16 << n) - 1 };
                let at = out.add(LANES * v);
                let y = if t.first {
                    _mm512_sub_epi32(s, c)
                } else {
                    _mm512_add_epi32(s, _mm512_maskz_loadu_epi32(m, at))
                };
                _mm512_mask_storeu_epi32(at, m, y);
            }
        }
    }
}

/// A tile's requantization: its first output code and its rows' factors.
#[derive(Clone, Copy)]
struct Codes<'f> {
    out: *mut u8,
    mult: *const f32,
    bias: *const f32,
    f: &'f Fused<'f>,
}

/// [`tile_sums`] over the whole row length (one k-block), each sum then requantized in
/// registers as `requant::requant_row` does, in the same f32 operations and order:
/// `(acc - corr) as f32 * mult + bias`, times `inv_scale`, clamped (NaN to `lo`), plus the
/// rounding constant and the zero point, the low byte of the bits is the code.
///
/// # Safety
/// As [`tile_sums`] with `t.first` (one k-block) and `c.out.add(r * t.ldo)` in place of
/// `t.out.add(r * t.ldo)`, `c.mult` and `c.bias` valid for reads of `R` values; AVX-512BW
/// and VL available too.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_codes<const R: usize, const V: usize>(t: Tile, c: Codes) {
    // SAFETY: the features are available and the pointers cover every access (this
    // function's contract); the output stores are masked to the first `t.cols` codes of
    // each row.
    unsafe {
        let acc = sums::<R, V>(&t);
        let f = c.f;
        let inv = _mm512_set1_ps(f.inv_scale);
        let (lo, hi) = (_mm512_set1_ps(f.lo), _mm512_set1_ps(f.hi));
        let magic = _mm512_set1_ps(super::super::qtensor::MAGIC);
        let zp = _mm512_set1_ps(f.zero_point);
        for (r, acc) in acc.iter().enumerate() {
            let out = c.out.add(r * t.ldo);
            let corr = _mm512_set1_epi32(*t.corr.add(r));
            let mult = _mm512_set1_ps(*c.mult.add(r));
            let bias = _mm512_set1_ps(*c.bias.add(r));
            for (v, &s) in acc.iter().enumerate() {
                let n = t.cols.saturating_sub(LANES * v).min(LANES);
                if n == 0 {
                    break;
                }
                let m: __mmask16 = if n == LANES { !0 } else { (1u16 << n) - 1 };
                let y = _mm512_cvtepi32_ps(_mm512_sub_epi32(s, corr));
                let y = _mm512_add_ps(_mm512_mul_ps(y, mult), bias);
                // max(y, lo) is lo for a NaN y, as f32::max.
                let y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(y, inv), lo), hi);
                let y = _mm512_add_ps(_mm512_add_ps(y, magic), zp);
                let q = _mm512_cvtepi32_epi8(_mm512_castps_si512(y));
                _mm_mask_storeu_epi8(out.add(LANES * v).cast(), m, q);
            }
        }
    }
}

/// The sums of an `R` x `16 V` tile over its k-block.
///
/// # Safety
/// As [`tile_sums`] (only its reads of the weights and activations are made here).
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn sums<const R: usize, const V: usize>(t: &Tile) -> [[__m512i; V]; R] {
    // SAFETY: the features are available and `t`'s pointers cover the loop's reads: `t.kgroups` steps of 4 codes along `R` weight rows and of `64 V` activation
    // bytes.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); V]; R];
        let mut a = t.act;
        let mut w = t.w;
        for _ in 0..t.kgroups {
            let mut x = [_mm512_setzero_si512(); V];
            for (v, x) in x.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(a.add(64 * v).cast());
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let wb = _mm512_set1_epi32(w.add(r * t.kp).cast::<i32>().read_unaligned());
                for (acc, &x) in acc.iter_mut().zip(&x) {
                    *acc = _mm512_dpbusd_epi32(*acc, x, wb);
                }
            }
            a = a.add(t.act_stride);
            w = w.add(KG);
        }
        acc
    }
}

/// `sum_k x[k] * w[k]` over the common length, exact (wrapping) in i32: 64 codes per
/// `vpdpbusd`, the tail under a mask.
///
/// # Safety
/// AVX-512F, AVX-512BW and VNNI must be available (the slices' bounds are this function's
/// own business).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn dot(w: &[i8], x: &[u8]) -> i32 {
    // SAFETY: the features are available (this function's contract); every full load reads
    // 64 bytes at `i` with `i + 64 <= n`, `n` the shorter slice's length, and the tail's
    // masked loads touch only bytes `i .. n`, so inside both slices.
    unsafe {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_si512(); 2];
        let mut i = 0;
        while i + 128 <= n {
            for (h, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_si512(xp.add(i + 64 * h).cast());
                let wv = _mm512_loadu_si512(wp.add(i + 64 * h).cast());
                *acc = _mm512_dpbusd_epi32(*acc, xv, wv);
            }
            i += 128;
        }
        while i < n {
            let left = (n - i).min(64);
            let m: __mmask64 = if left == 64 { !0 } else { (1u64 << left) - 1 };
            let xv = _mm512_maskz_loadu_epi8(m, xp.add(i).cast());
            let wv = _mm512_maskz_loadu_epi8(m, wp.add(i).cast());
            acc[0] = _mm512_dpbusd_epi32(acc[0], xv, wv);
            i += left;
        }
        _mm512_reduce_add_epi32(_mm512_add_epi32(acc[0], acc[1]))
    }
}
