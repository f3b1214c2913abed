//! The AVX2 kernels: saturating (`vpmaddubsw`) and widening (`vpmaddwd` on i16), as tiles of
//! 4 weight rows over 16 or 8 positions, and the dot products of [`super::gemv`].

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Fused, PackedWeight, Panel, KG, K_BLOCK, O_TILE, P_TILE};

/// One tile's operands (raw pointers into the panel, weights and output).
#[derive(Clone, Copy)]
struct Tile<W> {
    /// First weight row of the tile, at k = 0.
    w: *const W,
    /// Weight row stride, in elements.
    kp: usize,
    /// The tile's first position in k-group 0.
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

/// `sum_k x[k] * w[k]` over the common length: 32 codes per `vpmaddubsw` (activations
/// <= 127), or 16 per `vpmaddwd` on codes widened to i16 (`wide`, any activations).
///
/// # Safety
/// AVX2 must be available (the slices' bounds are this function's own business).
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot(w: &[i8], x: &[u8], wide: bool) -> i32 {
    // SAFETY: AVX2 is available (this function's contract), so the intrinsics may run; every
    // load reads 16 or 32 bytes at `i` with `i + 16 <= n` or `i + 32 <= n`, `n` the shorter
    // slice's length, so inside both slices.
    unsafe {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = _mm256_setzero_si256();
        let mut i = 0;
        if wide {
            while i + 16 <= n {
                let xv = _mm256_cvtepu8_epi16(_mm_loadu_si128(xp.add(i).cast()));
                let wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp.add(i).cast()));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(xv, wv));
                i += 16;
            }
        } else {
            let ones = _mm256_set1_epi16(1);
            while i + 32 <= n {
                let xv = _mm256_loadu_si256(xp.add(i).cast());
                let wv = _mm256_loadu_si256(wp.add(i).cast());
                let pairs = _mm256_maddubs_epi16(xv, wv);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
                i += 32;
            }
        }
        let s = _mm_add_epi32(
            _mm256_castsi256_si128(acc),
            _mm256_extracti128_si256::<1>(acc),
        );
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        let mut total = _mm_cvtsi128_si32(s);
        for j in i..n {
            total = total.wrapping_add(w[j] as i32 * x[j] as i32);
        }
        total
    }
}

/// Every tile of a block of rows: positions in steps of a tile (the panel slice stays in
/// cache), weight rows inside.
///
/// # Safety
/// AVX2 must be available; `rows` must lie inside `w`, `panel` must hold `w.kp / 4`
/// k-groups (packed for `w.row_len`), `corr` and `out` must hold at least `rows.len()`
/// and `rows.len() * panel.positions` values (`super::check_block` checks all of it).
#[target_feature(enable = "avx2")]
pub(super) unsafe fn block(
    w: &PackedWeight,
    rows: Range<usize>,
    corr: &[i32],
    panel: &Panel,
    out: &mut [i32],
    wide: bool,
) {
    // SAFETY: AVX2 is available and the operands fit (this function's contract, checked by
    // `check_block`). Then every access lies in bounds: the panel reads of a tile are 64
    // bytes at k-group `k0 + g < kp / 4` and position `p0 < positions`, and `p0 + 16 <=
    // stride` (`Panel::reset`), inside the panel's `kgroups * stride * 4` bytes; `widened`
    // holds `K_BLOCK * 64` i16 and a block has `kn <= K_BLOCK` k-groups; a tile's weight
    // rows are `rows.start + r .. + mr <= rows.end <= w.rows` rows of `kp` codes, read up to
    // k-group `k0 + kn <= kp / 4`; its `corr` are `r .. r + mr <= rows.len()`; its outputs
    // are rows `r .. r + mr` of `positions` at columns `p0 .. p0 + cols <= positions`.
    unsafe {
        let p = panel.positions;
        let nrows = rows.len();
        let act = panel.bytes().as_ptr();
        let act_stride = panel.stride * KG;
        let kgroups = w.kp / KG;
        // The widening kernel reads the slice of a tile (16 positions x one k-block) as i16,
        // widened once here and reused by every row tile: 64 i16 per k-group.
        let (wide_codes, mut widened) = if wide {
            (w.wide(), vec![0i16; K_BLOCK * KG * P_TILE])
        } else {
            (&[][..], Vec::new())
        };
        let mut k0 = 0;
        while k0 < kgroups {
            let kn = (kgroups - k0).min(K_BLOCK);
            let mut p0 = 0;
            while p0 < p {
                let cols = (p - p0).min(P_TILE);
                let slice = act.add((k0 * panel.stride + p0) * KG);
                if wide {
                    for g in 0..kn {
                        let src = slice.add(g * act_stride);
                        let dst = widened.as_mut_ptr().add(g * KG * P_TILE);
                        for h in 0..4 {
                            let v = _mm256_cvtepu8_epi16(_mm_loadu_si128(src.add(16 * h).cast()));
                            _mm256_storeu_si256(dst.add(16 * h).cast(), v);
                        }
                    }
                }
                let mut r = 0;
                while r < nrows {
                    let mr = (nrows - r).min(O_TILE);
                    let base = Tile {
                        w: std::ptr::null::<()>(),
                        kp: w.kp,
                        act: slice,
                        act_stride,
                        kgroups: kn,
                        corr: corr.as_ptr().add(r),
                        first: k0 == 0,
                        out: out.as_mut_ptr().add(r * p + p0),
                        ldo: p,
                        cols,
                    };
                    let row0 = (rows.start + r) * w.kp + k0 * KG;
                    if wide {
                        // Two tiles of 8 positions over the widened slice.
                        for half in 0..cols.div_ceil(8) {
                            let mut t = base.with(wide_codes.as_ptr().add(row0));
                            t.act = widened.as_ptr().add(32 * half).cast();
                            t.act_stride = KG * P_TILE * 2;
                            t.out = t.out.add(8 * half);
                            t.cols = (cols - 8 * half).min(8);
                            match mr {
                                4 => tile_wide::<4>(t),
                                3 => tile_wide::<3>(t),
                                2 => tile_wide::<2>(t),
                                _ => tile_wide::<1>(t),
                            }
                        }
                    } else {
                        let t = base.with(w.codes.as_ptr().add(row0));
                        match mr {
                            4 => tile_madd::<4>(t),
                            3 => tile_madd::<3>(t),
                            2 => tile_madd::<2>(t),
                            _ => tile_madd::<1>(t),
                        }
                    }
                    r += mr;
                }
                p0 += P_TILE;
            }
            k0 += kn;
        }
    }
}

impl Tile<()> {
    fn with<W>(self, w: *const W) -> Tile<W> {
        Tile {
            w,
            kp: self.kp,
            act: self.act,
            act_stride: self.act_stride,
            kgroups: self.kgroups,
            corr: self.corr,
            first: self.first,
            out: self.out,
            ldo: self.ldo,
            cols: self.cols,
        }
    }
}

/// `MR` rows x 16 positions with `vpmaddubsw` (activations must be <= 127).
///
/// # Safety
/// AVX2 must be available; `t.w` valid for reads of `MR` rows (`t.kp` apart) of
/// `4 * t.kgroups` codes, `t.act` of `t.kgroups` k-groups (`t.act_stride` bytes apart)
/// of 64 bytes, and `t` as [`finish`] needs for each row.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tile_madd<const MR: usize>(t: Tile<i8>) {
    // SAFETY: AVX2 is available and `t`'s pointers cover the reads of `madd_sums` (this
    // function's contract); `finish` gets the same `t` with `r < MR`.
    unsafe {
        let acc = madd_sums::<MR>(&t);
        for (r, acc) in acc.iter().enumerate() {
            finish(&t, r, acc);
        }
    }
}

/// The sums of an `MR` x 16 tile over its k-block with `vpmaddubsw` (activations must be
/// <= 127): per row, positions 0-7 and 8-15.
///
/// # Safety
/// AVX2 must be available; `t.w` valid for reads of `MR` rows (`t.kp` apart) of
/// `4 * t.kgroups` codes, `t.act` of `t.kgroups` k-groups (`t.act_stride` bytes apart)
/// of 64 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn madd_sums<const MR: usize>(t: &Tile<i8>) -> [[__m256i; 2]; MR] {
    // SAFETY: AVX2 is available and `t`'s pointers cover the loop's reads (this
    // function's contract): `t.kgroups` steps of 4 codes along `MR` weight rows and of 64
    // activation bytes.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        let mut a = t.act;
        let mut w = t.w;
        for _ in 0..t.kgroups {
            let x0 = _mm256_loadu_si256(a.cast());
            let x1 = _mm256_loadu_si256(a.add(32).cast());
            for (r, acc) in acc.iter_mut().enumerate() {
                let wb = _mm256_set1_epi32(w.add(r * t.kp).cast::<i32>().read_unaligned());
                let s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(x0, wb), ones);
                let s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(x1, wb), ones);
                acc[0] = _mm256_add_epi32(acc[0], s0);
                acc[1] = _mm256_add_epi32(acc[1], s1);
            }
            a = a.add(t.act_stride);
            w = w.add(KG);
        }
        acc
    }
}

/// Every 4-row x 16-position tile of a block of rows with `vpmaddubsw` (activations <= 127)
/// over the whole row length (one k-block), each row's sums requantized in registers into
/// `out` (`rows.len()` rows of `positions` codes) as `requant::requant_row` does, in the
/// same f32 operations and order.
///
/// # Safety
/// AVX2 must be available; `rows` must lie inside `w`, `panel` must hold `w.kp / 4 <=
/// K_BLOCK` k-groups, `corr`, `f.mult` and `f.bias` must hold `rows.len()` values and `out`
/// `rows.len() * panel.positions` codes.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn block_codes(
    w: &PackedWeight,
    rows: Range<usize>,
    corr: &[i32],
    panel: &Panel,
    out: &mut [u8],
    f: &Fused,
) {
    // SAFETY: AVX2 is available and the operands fit (this function's contract). A tile
    // reads 64 bytes per k-group at position `p0 < positions` with `p0 + 16 <= stride`
    // (`Panel::reset`), its weight rows `rows.start + r .. + mr <= rows.end <= w.rows`
    // (all `kp / 4` k-groups), its `corr`, `mult` and `bias` at `r .. r + mr <=
    // rows.len()`, and writes codes of rows `r .. r + mr` at columns `p0 .. p0 + cols <=
    // positions`.
    unsafe {
        let p = panel.positions;
        let nrows = rows.len();
        let act = panel.bytes().as_ptr();
        let mut p0 = 0;
        while p0 < p {
            let cols = (p - p0).min(P_TILE);
            let mut r = 0;
            while r < nrows {
                let mr = (nrows - r).min(O_TILE);
                let t = Tile {
                    w: w.codes.as_ptr().add((rows.start + r) * w.kp),
                    kp: w.kp,
                    act: act.add(p0 * KG),
                    act_stride: panel.stride * KG,
                    kgroups: w.kp / KG,
                    corr: corr.as_ptr().add(r),
                    first: true,
                    out: std::ptr::null_mut(),
                    ldo: p,
                    cols,
                };
                let c = CodesOut {
                    out: out.as_mut_ptr().add(r * p + p0),
                    mult: f.mult.as_ptr().add(r),
                    bias: f.bias.as_ptr().add(r),
                    f,
                };
                match mr {
                    4 => tile_madd_codes::<4>(t, c),
                    3 => tile_madd_codes::<3>(t, c),
                    2 => tile_madd_codes::<2>(t, c),
                    _ => tile_madd_codes::<1>(t, c),
                }
                r += mr;
            }
            p0 += P_TILE;
        }
    }
}

/// A tile's requantization: its first output code and its rows' factors.
#[derive(Clone, Copy)]
struct CodesOut<'f> {
    out: *mut u8,
    mult: *const f32,
    bias: *const f32,
    f: &'f Fused<'f>,
}

/// [`madd_sums`] over the whole row length, then per row: `(acc - corr) as f32 * mult +
/// bias`, times `inv_scale`, clamped (NaN to `lo`), plus the rounding constant and the zero
/// point; the low byte of the bits is the code. The first `t.cols` codes of each row are
/// written at `c.out + r * t.ldo`.
///
/// # Safety
/// As [`madd_sums`]; `t.corr`, `c.mult` and `c.bias` valid for reads of `MR` values and
/// `c.out.add(r * t.ldo)`, `r < MR`, for writes of `t.cols <= 16` codes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tile_madd_codes<const MR: usize>(t: Tile<i8>, c: CodesOut) {
    // SAFETY: AVX2 is available and the pointers cover every access (this function's
    // contract); a full row stores 16 codes in place, a partial one copies `t.cols` codes
    // from a 16-byte buffer.
    unsafe {
        let acc = madd_sums::<MR>(&t);
        let f = c.f;
        let inv = _mm256_set1_ps(f.inv_scale);
        let (lo, hi) = (_mm256_set1_ps(f.lo), _mm256_set1_ps(f.hi));
        let magic = _mm256_set1_ps(super::super::qtensor::MAGIC);
        let zp = _mm256_set1_ps(f.zero_point);
        let byte = _mm256_set1_epi32(0xff);
        for (r, acc) in acc.iter().enumerate() {
            let corr = _mm256_set1_epi32(*t.corr.add(r));
            let mult = _mm256_set1_ps(*c.mult.add(r));
            let bias = _mm256_set1_ps(*c.bias.add(r));
            let mut q = [_mm256_setzero_si256(); 2];
            for (q, &s) in q.iter_mut().zip(acc) {
                let y = _mm256_cvtepi32_ps(_mm256_sub_epi32(s, corr));
                let y = _mm256_add_ps(_mm256_mul_ps(y, mult), bias);
                // max(y, lo) is lo for a NaN y, as f32::max.
                let y = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(y, inv), lo), hi);
                let y = _mm256_add_ps(_mm256_add_ps(y, magic), zp);
                *q = _mm256_and_si256(_mm256_castps_si256(y), byte);
            }
            // 16 words of one byte each into 16 bytes in order: packs work per 128-bit
            // lane, the permutes put the halves back in order.
            let w16 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(q[0], q[1]));
            let b8 = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi16(w16, w16));
            let codes = _mm256_castsi256_si128(b8);
            let out = c.out.add(r * t.ldo);
            if t.cols == 16 {
                _mm_storeu_si128(out.cast(), codes);
            } else {
                let mut tmp = [0u8; 16];
                _mm_storeu_si128(tmp.as_mut_ptr().cast(), codes);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), out, t.cols);
            }
        }
    }
}

/// `MR` rows x 8 positions of activations already widened to i16 (any codes): lane
/// `2i + h` of an accumulator sums half `h` (codes 0-1 or 2-3 of each k-group) of
/// position `i`.
///
/// # Safety
/// AVX2 must be available; `t.w` valid for reads of `MR` rows (`t.kp` apart) of
/// `4 * t.kgroups` i16 codes, `t.act` of `t.kgroups` k-groups (`t.act_stride` bytes
/// apart) of 64 bytes, and `t` as [`finish`] needs for each row.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tile_wide<const MR: usize>(t: Tile<i16>) {
    // SAFETY: AVX2 is available and `t`'s pointers cover the loop's reads (this
    // function's contract): `t.kgroups` steps of 4 i16 codes along `MR` weight rows and of
    // 64 bytes of widened activations; `finish` gets the same `t` with `r < MR`.
    unsafe {
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        let mut a = t.act;
        let mut w = t.w;
        for _ in 0..t.kgroups {
            let lo = _mm256_loadu_si256(a.cast());
            let hi = _mm256_loadu_si256(a.add(32).cast());
            for (r, acc) in acc.iter_mut().enumerate() {
                let wb = _mm256_set1_epi64x(w.add(r * t.kp).cast::<i64>().read_unaligned());
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(lo, wb));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(hi, wb));
            }
            a = a.add(t.act_stride);
            w = w.add(KG);
        }
        for (r, acc) in acc.iter().enumerate() {
            // hadd: [p0 p1 p4 p5 | p2 p3 p6 p7]; the permute puts the positions in order.
            let s = _mm256_permute4x64_epi64::<0xD8>(_mm256_hadd_epi32(acc[0], acc[1]));
            finish(&t, r, &[s]);
        }
    }
}

/// Row `r` of a tile, `v` its sums over this k-block (8 positions per vector): the
/// first block stores `v - corr`, later ones add `v` to what is stored. Only the first
/// `cols` positions are touched.
///
/// # Safety
/// AVX2 must be available; `t.corr.add(r)` valid for a read, `t.out.add(r * t.ldo)` for
/// reads and writes of `t.cols <= 8 * v.len()` values.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn finish<W>(t: &Tile<W>, r: usize, v: &[__m256i]) {
    // `tmp` below holds two vectors (folded away: callers pass arrays of 1 or 2).
    assert!(
        v.len() <= 2,
        "finish: {} vectors for a 16-value buffer",
        v.len()
    );
    // SAFETY: AVX2 is available and row `r`'s correction and `t.cols` outputs are valid
    // (this function's contract). A full row (`cols == 8 * v.len()`) is loaded and stored
    // in place; a partial one goes through `tmp` (16 values >= 8 * v.len(), `v` holding at
    // most 2 vectors), copying only `cols` values from and back to the output.
    unsafe {
        let out = t.out.add(r * t.ldo);
        let full = t.cols == 8 * v.len();
        let mut tmp = [0i32; 16];
        let base: *mut i32 = if full { out } else { tmp.as_mut_ptr() };
        if !t.first && !full {
            std::ptr::copy_nonoverlapping(out, base, t.cols);
        }
        let c = _mm256_set1_epi32(*t.corr.add(r));
        for (i, x) in v.iter().enumerate() {
            let at = base.add(8 * i).cast::<__m256i>();
            let y = if t.first {
                _mm256_sub_epi32(*x, c)
            } else {
                _mm256_add_epi32(*x, _mm256_loadu_si256(at))
            };
            _mm256_storeu_si256(at, y);
        }
        if !full {
            std::ptr::copy_nonoverlapping(base, out, t.cols);
        }
    }
}
