//! u8 x i8 -> i32 matrix products: `acc[o][p] = sum_k (x[p][k] - x_zp) * w[o][k]`, exact.
//!
//! Computed as `sum_k x[p][k] * w[o][k] - x_zp * sum_k w[o][k]` (the row sums are kept with
//! the weight). Operands:
//! - weights ([`PackedWeight`]): row-major `(rows, kp)` i8 codes, each row padded with zeros
//!   to `kp`, a multiple of 4 (a "k-group");
//! - activations ([`Panel`]): for each k-group, the 4 codes of every position side by side:
//!   byte `4 * (g * stride + p) + j` is `x[p][4 g + j]`. A linear layer packs its input rows
//!   so; a convolution writes its im2col straight into this layout.
//!
//! Kernels (all give the same integers):
//! - AVX2, saturating (`vpmaddubsw` + `vpmaddwd`): a tile of 4 weight rows x 16 positions,
//!   8 accumulators of 8 i32. Per k-group: two 32-byte activation loads (16 positions x 4
//!   codes), one 4-byte weight broadcast per row, `vpmaddubsw` (u8 x i8 products summed in
//!   pairs into i16, SATURATING), `vpmaddwd` by ones (pairs of i16 into i32), `vpaddd`. A
//!   pair of products stays within i16 only if activations are <= 127:
//!   `2 * 127 * 128 = 32512 <= 32767`, while `2 * 255 * 128 = 65280` saturates. So this path
//!   runs only when the largest activation code (the input's, and the padding value) is
//!   <= 127 — the case of the fbgemm/x86 presets, whose activations train in 0..=127.
//! - AVX2, widening (exact for any u8): codes are widened to i16 (the activations of a
//!   tile's 16 positions x one k-block once, `vpmovzxbw`, reused by every row tile; the
//!   weights once on first use), and `vpmaddwd` multiplies and sums pairs straight into i32:
//!   a tile of 4 weight rows x 8 positions, 8 accumulators whose pair halves are folded with
//!   `vphaddd` at the end. Used for full-range activations (qnnpack's 0..=255). It issues as
//!   many multiplies per product as the saturating path, but one add per 16 products
//!   instead of per 32 (about 25% slower on the machines we measured).
//! - Portable: plain Rust over the same layout, for CPUs without AVX2 and other targets.
//! - Dot products ([`gemv`]) for products of at most [`GEMV_MAX`] activation rows (a linear
//!   layer at batch 1), where a 16-position tile would mostly compute padding: each weight row
//!   against each activation row, 32 codes per `vpmaddubsw` or 16 per widened `vpmaddwd`.
//!
//! The AVX2 kernels walk k in blocks of `K_BLOCK` k-groups (a tile's panel slice stays
//! in L1 while the block's weight rows stream by), positions in tiles of 16 and weight rows
//! in tiles of 4. Sums are exact in i32 for rows of up to [`MAX_ROW_LEN`] codes (additions
//! wrap, and the exact result fits); products are spread over rayon tasks (blocks of weight
//! rows) when a product is large.

use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::qtensor::max_code;
use super::weight::QuantizedWeight;
use crate::error::{Error, Result};

/// Longest weight row (codes per output channel) whose sums stay exact in i32:
/// `|x - x_zp| <= 255` and `|w| <= 128`, so `len * 255 * 128 <= i32::MAX`.
pub const MAX_ROW_LEN: usize = (i32::MAX / (255 * 128)) as usize;

/// Codes per k-group: one i32 lane of the AVX2 kernels.
const KG: usize = 4;
/// Positions per tile of the saturating AVX2 kernel; panels pad positions to a multiple of
/// it (plus one tile of slack for the im2col's overlapping writes).
pub(crate) const P_TILE: usize = 16;
/// Weight rows per tile.
const O_TILE: usize = 4;
/// k-groups per block of the AVX2 kernels: a tile's slice of the panel (16 positions x
/// 4 codes x `K_BLOCK`) stays in L1 while the tile walks the block's weight rows.
const K_BLOCK: usize = 128;
/// Multiply-adds (rows x positions x k) below which a product runs on the calling thread.
const PAR_WORK: usize = 1 << 22;

/// Which integer kernel computes the products.
///
/// ```
/// use qat_core::quantized::{gemm_u8_i8, Kernel, QuantizedWeight};
/// let w = QuantizedWeight::from_codes(vec![1, -2, 3, 4, 5, -6], &[2, 3], &[0.1])?;
/// let x = [10u8, 20, 30, 255, 0, 7];
/// let auto = gemm_u8_i8(&x, 3, &w, Kernel::Auto)?;
/// assert_eq!(auto, gemm_u8_i8(&x, 3, &w, Kernel::Portable)?);
/// // (10-3)*1 + (20-3)*(-2) + (30-3)*3 = 54
/// assert_eq!(auto[0], 54);
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kernel {
    /// AVX2 when the CPU has it, else portable.
    #[default]
    Auto,
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 (errors where the CPU lacks it): the saturating `vpmaddubsw` kernel when every
    /// activation code is <= 127, the widening one otherwise.
    Avx2,
}

impl Kernel {
    /// Whether this kernel can run on this CPU.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Auto | Kernel::Portable => true,
            Kernel::Avx2 => has_avx2(),
        }
    }

    /// The kernel `Auto` stands for on this CPU (others are returned as they are).
    pub fn resolved(self) -> Kernel {
        match self {
            Kernel::Auto if has_avx2() => Kernel::Avx2,
            Kernel::Auto => Kernel::Portable,
            k => k,
        }
    }

    /// The code path for activations whose largest code is `max_code`.
    pub(crate) fn path(self, max_code: u8) -> Result<Path> {
        match self.resolved() {
            Kernel::Avx2 if !has_avx2() => Err(Error::config(
                "the AVX2 int8 kernel was asked for on a CPU without AVX2",
                "use Kernel::Auto or Kernel::Portable",
            )),
            Kernel::Avx2 if max_code <= 127 => Ok(Path::Avx2Madd),
            Kernel::Avx2 => Ok(Path::Avx2Wide),
            _ => Ok(Path::Portable),
        }
    }
}

/// A kernel and, for AVX2, the saturating or the widening variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    Portable,
    /// `vpmaddubsw`: only for activation codes <= 127.
    Avx2Madd,
    /// Widened to i16 and `vpmaddwd`: any activation codes.
    Avx2Wide,
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A byte buffer aligned to 64 (cache lines), so that tiles of 16 positions load whole
/// lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

#[derive(Clone, Default)]
struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    /// Resizes to `len` bytes; bytes kept from before stay, new ones are zero.
    fn resize(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(64), Line([0; 64]));
        self.len = len;
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes (repr(C), no padding) and `len` is at most
        // `lines.len() * 64`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    fn words_mut(&mut self) -> &mut [u32] {
        // SAFETY: as `bytes`; the buffer is aligned to 64 >= align_of::<u32>() and every bit
        // pattern is a valid u32.
        unsafe {
            std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u32>(), self.len / 4)
        }
    }
}

/// Activations laid out for the kernels: per k-group, `stride` positions of 4 codes each
/// (one u32 word per position). Positions from `positions` to `stride` are padding: the
/// kernels compute them and the results are dropped.
#[derive(Clone, Default)]
pub(crate) struct Panel {
    buf: AlignedBytes,
    positions: usize,
    stride: usize,
    kgroups: usize,
}

impl Panel {
    /// Resizes for `positions` rows of `row_len` codes. Bytes of an earlier use may remain:
    /// writers fill every k-group of every position below `positions`, the codes past
    /// `row_len` in the last k-group included (with zeros, or codes whose weights are zero).
    pub(crate) fn reset(&mut self, positions: usize, row_len: usize) {
        self.positions = positions;
        self.stride = positions.next_multiple_of(P_TILE) + P_TILE;
        self.kgroups = row_len.div_ceil(KG);
        self.buf.resize(self.kgroups * self.stride * KG);
    }

    /// The words, `kgroups` rows of `stride`: word `g * stride + p` holds
    /// `x[p][4g..4g + 4]` in memory order (`u32::from_ne_bytes`).
    pub(crate) fn words_mut(&mut self) -> &mut [u32] {
        self.buf.words_mut()
    }

    /// Words per k-group row.
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    /// Packs `m` rows of `k` codes (row-major `x`), k-group by k-group: the writes run
    /// along a k-group row and the reads revisit the same few cache lines of each input row.
    pub(crate) fn from_rows(x: &[u8], m: usize, k: usize) -> Panel {
        let mut panel = Panel::default();
        panel.reset(m, k);
        let s = panel.stride;
        let words = panel.words_mut();
        for (g, dst) in words.chunks_exact_mut(s).enumerate() {
            let (at, n) = (g * KG, (k - g * KG).min(KG));
            let rows = dst[..m].iter_mut().zip(x.chunks_exact(k));
            if n == KG {
                for (d, row) in rows {
                    let c = &row[at..at + KG];
                    *d = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                }
            } else {
                for (d, row) in rows {
                    let mut b = [0u8; KG];
                    b[..n].copy_from_slice(&row[at..]);
                    *d = u32::from_ne_bytes(b);
                }
            }
        }
        panel
    }

    fn bytes(&self) -> &[u8] {
        self.buf.bytes()
    }
}

/// Weight codes laid out for the kernels, with each row's code sum.
pub(crate) struct PackedWeight {
    pub(crate) rows: usize,
    pub(crate) row_len: usize,
    /// Row stride: `row_len` rounded up to a multiple of 4.
    kp: usize,
    /// `(rows, kp)`, zero-padded.
    codes: Vec<i8>,
    row_sums: Vec<i32>,
    /// The codes widened to i16, for the widening AVX2 kernel (built on first use).
    wide: OnceLock<Vec<i16>>,
}

impl PackedWeight {
    pub(crate) fn new(codes: &[i8], rows: usize, row_len: usize) -> Self {
        let kp = row_len.next_multiple_of(KG);
        let mut padded = vec![0i8; rows * kp];
        let mut row_sums = Vec::with_capacity(rows);
        for (dst, src) in padded.chunks_exact_mut(kp).zip(codes.chunks_exact(row_len)) {
            dst[..row_len].copy_from_slice(src);
            row_sums.push(src.iter().map(|&c| c as i32).sum());
        }
        PackedWeight {
            rows,
            row_len,
            kp,
            codes: padded,
            row_sums,
            wide: OnceLock::new(),
        }
    }

    fn wide(&self) -> &[i16] {
        self.wide
            .get_or_init(|| self.codes.iter().map(|&c| c as i16).collect())
    }
}

/// `out[i][p] = sum_k (x[p][k] - x_zp) * w[rows.start + i][k]` for every position of the
/// panel: `out` is `(rows.len(), panel positions)`, row-major.
pub(crate) fn gemm(
    path: Path,
    w: &PackedWeight,
    rows: Range<usize>,
    panel: &Panel,
    x_zp: i32,
    out: &mut [i32],
) {
    let p = panel.positions;
    let nrows = rows.len();
    if nrows == 0 || p == 0 {
        return;
    }
    let corr: Vec<i32> = rows
        .clone()
        .map(|o| x_zp.wrapping_mul(w.row_sums[o]))
        .collect();
    let threads = rayon::current_num_threads();
    let work = nrows * p * w.kp;
    if threads > 1 && work >= PAR_WORK && nrows > O_TILE {
        let blocks = (4 * threads).min(nrows.div_ceil(O_TILE));
        let ob = nrows.div_ceil(blocks).next_multiple_of(O_TILE);
        out[..nrows * p]
            .par_chunks_mut(ob * p)
            .zip(corr.par_chunks(ob))
            .enumerate()
            .for_each(|(i, (out, corr))| {
                let r0 = rows.start + i * ob;
                let r1 = (r0 + ob).min(rows.end);
                run_block(path, w, r0..r1, corr, panel, out);
            });
    } else {
        run_block(path, w, rows, &corr, panel, out);
    }
}

/// Positions up to which a product runs as dot products ([`gemv`]): the kernels' tiles of 16
/// positions would mostly compute padding (a linear layer at batch 1 fills one of 16).
pub(crate) const GEMV_MAX: usize = 4;

/// `out[o][p] = sum_k (x[p][k] - x_zp) * w[o][k]` for the few rows of `x` (row-major,
/// `w.row_len` codes each) as one dot product per weight row and position; `out` is
/// `(w.rows, m)`. The same integers as [`gemm`].
pub(crate) fn gemv(path: Path, w: &PackedWeight, x: &[u8], x_zp: i32, out: &mut [i32]) {
    let k = w.row_len;
    if k == 0 {
        out.fill(0);
        return;
    }
    let m = x.len() / k;
    if m == 0 {
        return;
    }
    let run = |(o, out): (usize, &mut [i32])| {
        let wrow = &w.codes[o * w.kp..o * w.kp + k];
        let corr = x_zp.wrapping_mul(w.row_sums[o]);
        for (acc, xrow) in out.iter_mut().zip(x.chunks_exact(k)) {
            *acc = dot(path, wrow, xrow).wrapping_sub(corr);
        }
    };
    let out = &mut out[..w.rows * m];
    if rayon::current_num_threads() > 1 && w.rows * m * k >= PAR_WORK {
        out.par_chunks_mut(m).enumerate().for_each(run);
    } else {
        out.chunks_mut(m).enumerate().for_each(run);
    }
}

/// `sum_k x[k] * w[k]`, exact (wrapping) in i32.
fn dot(path: Path, w: &[i8], x: &[u8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if path != Path::Portable && has_avx2() {
        // SAFETY: AVX2 is present (checked above); `dot` reads only inside both slices.
        return unsafe { x86::dot(w, x, path == Path::Avx2Wide) };
    }
    let _ = path;
    w.iter()
        .zip(x)
        .fold(0i32, |a, (&w, &x)| a.wrapping_add(w as i32 * x as i32))
}

/// One block of weight rows over every position, on the calling thread.
fn run_block(
    path: Path,
    w: &PackedWeight,
    rows: Range<usize>,
    corr: &[i32],
    panel: &Panel,
    out: &mut [i32],
) {
    debug_assert!(rows.end <= w.rows && corr.len() >= rows.len());
    debug_assert!(out.len() >= rows.len() * panel.positions);
    #[cfg(target_arch = "x86_64")]
    if path != Path::Portable && has_avx2() {
        let wide = path == Path::Avx2Wide;
        // SAFETY: AVX2 is present (checked above); `rows` lie inside the weight, the panel
        // holds `kp / 4` k-groups of `stride >= positions rounded up to 16` positions, and
        // `out` holds `rows.len() * positions` sums (asserted above, guaranteed by callers).
        unsafe { x86::block(w, rows, corr, panel, out, wide) };
        return;
    }
    portable(w, rows, corr, panel, out);
}

/// The portable kernel: for each weight row, k-group by k-group over all positions (the
/// inner loop runs over contiguous positions and vectorises).
fn portable(w: &PackedWeight, rows: Range<usize>, corr: &[i32], panel: &Panel, out: &mut [i32]) {
    let p = panel.positions;
    let s = panel.stride * KG;
    let bytes = panel.bytes();
    for ((o, out), &c) in rows.zip(out.chunks_exact_mut(p)).zip(corr) {
        out.fill(c.wrapping_neg());
        let wrow = &w.codes[o * w.kp..(o + 1) * w.kp];
        for (g, w4) in wrow.chunks_exact(KG).enumerate() {
            let (w0, w1, w2, w3) = (w4[0] as i32, w4[1] as i32, w4[2] as i32, w4[3] as i32);
            let acts = &bytes[g * s..g * s + p * KG];
            for (acc, x) in out.iter_mut().zip(acts.chunks_exact(KG)) {
                let d = x[0] as i32 * w0 + x[1] as i32 * w1 + x[2] as i32 * w2 + x[3] as i32 * w3;
                *acc = acc.wrapping_add(d);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{PackedWeight, Panel, KG, K_BLOCK, O_TILE, P_TILE};

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
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot(w: &[i8], x: &[u8], wide: bool) -> i32 {
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

    /// Every tile of a block of rows: positions in steps of a tile (the panel slice stays in
    /// cache), weight rows inside.
    ///
    /// # Safety
    /// AVX2 must be available; `rows` inside `w`, `corr` and `out` sized for them.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn block(
        w: &PackedWeight,
        rows: Range<usize>,
        corr: &[i32],
        panel: &Panel,
        out: &mut [i32],
        wide: bool,
    ) {
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
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn tile_madd<const MR: usize>(t: Tile<i8>) {
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
        for (r, acc) in acc.iter().enumerate() {
            finish(&t, r, acc);
        }
    }

    /// `MR` rows x 8 positions of activations already widened to i16 (any codes): lane
    /// `2i + h` of an accumulator sums half `h` (codes 0-1 or 2-3 of each k-group) of
    /// position `i`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn tile_wide<const MR: usize>(t: Tile<i16>) {
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

    /// Row `r` of a tile, `v` its sums over this k-block (8 positions per vector): the
    /// first block stores `v - corr`, later ones add `v` to what is stored. Only the first
    /// `cols` positions are touched.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn finish<W>(t: &Tile<W>, r: usize, v: &[__m256i]) {
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

/// Integer products of u8 activation codes and int8 weights:
/// `acc[m][o] = sum_k (x[m][k] - x_zero_point) * w[o][k]`, exact, as an `(m, out)` row-major
/// `Vec<i32>`, where `x` is `m` rows of `w.row_len()` codes.
///
/// This is the accumulation under [`quantized_linear`](super::quantized_linear) and
/// [`quantized_conv2d`](super::quantized_conv2d), exposed to check kernels against each other
/// and to build other integer layers. Errors when `x`'s length is not a multiple of the row
/// length, when the zero point is outside `0..=255`, or when `kernel` cannot run here.
pub fn gemm_u8_i8(
    x: &[u8],
    x_zero_point: i32,
    w: &QuantizedWeight,
    kernel: Kernel,
) -> Result<Vec<i32>> {
    let k = w.row_len();
    if !x.len().is_multiple_of(k) {
        return Err(Error::tensor(
            format!("{} activation codes are not rows of {k}", x.len()),
            "give whole rows of w.row_len() codes",
        ));
    }
    if !(0..=255).contains(&x_zero_point) {
        return Err(Error::qparams(
            format!("activation zero point {x_zero_point} is outside 0..=255"),
            "use the zero point the u8 codes were quantized with",
        ));
    }
    let path = kernel.path(max_code(x))?;
    Ok(gemm_rows(path, x, x_zero_point, w.packed()))
}

/// `(m, out)` sums of `m` rows of codes with a given path.
pub(crate) fn gemm_rows(path: Path, x: &[u8], x_zp: i32, w: &PackedWeight) -> Vec<i32> {
    let m = x.len() / w.row_len;
    let mut acc_t = vec![0i32; w.rows * m];
    if m <= GEMV_MAX {
        gemv(path, w, x, x_zp, &mut acc_t);
    } else {
        let panel = Panel::from_rows(x, m, w.row_len);
        gemm(path, w, 0..w.rows, &panel, x_zp, &mut acc_t);
    }
    let mut acc = vec![0i32; m * w.rows];
    for (o, row) in acc_t.chunks_exact(m.max(1)).enumerate() {
        for (mi, &v) in row.iter().enumerate() {
            acc[mi * w.rows + o] = v;
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) as u32
        }
        fn below(&mut self, n: u32) -> u32 {
            self.next() % n
        }
    }

    fn naive(x: &[u8], zp: i32, codes: &[i8], o: usize, k: usize) -> Vec<i32> {
        let m = x.len() / k;
        let mut out = vec![0i32; m * o];
        for mi in 0..m {
            for oi in 0..o {
                let s: i64 = (0..k)
                    .map(|j| (x[mi * k + j] as i64 - zp as i64) * codes[oi * k + j] as i64)
                    .sum();
                out[mi * o + oi] = i32::try_from(s).expect("fits");
            }
        }
        out
    }

    fn paths() -> Vec<Path> {
        let mut p = vec![Path::Portable];
        if has_avx2() {
            p.extend([Path::Avx2Madd, Path::Avx2Wide]);
        }
        p
    }

    #[test]
    fn all_paths_equal_naive_on_random_shapes() {
        let mut rng = Lcg(42);
        let shapes = [
            (1, 1, 1),
            (1, 3, 1),
            (3, 5, 7),
            (5, 17, 9),
            (7, 31, 13),
            (16, 32, 16),
            (17, 33, 5),
            (33, 65, 19),
            (64, 100, 10),
            (9, 127, 130),
            (65, 289, 37),
            (130, 70, 66),
            (19, 1031, 23),
            (50, 515, 9),
            // Up to GEMV_MAX positions: dot products (32- and 16-code steps, then a tail).
            (1, 3136, 12),
            (2, 1031, 5),
            (4, 97, 33),
            (GEMV_MAX + 1, 70, 6),
        ];
        for &(m, k, o) in &shapes {
            for &(amax, zp_kind) in &[
                (127u32, 0),
                (127, 1),
                (127, 2),
                (255, 0),
                (255, 1),
                (255, 2),
            ] {
                let x: Vec<u8> = (0..m * k).map(|_| rng.below(amax + 1) as u8).collect();
                let mut codes: Vec<i8> = (0..o * k).map(|_| rng.below(256) as u8 as i8).collect();
                // Extreme codes at the start of each row: saturation-prone pairs.
                codes[0] = -128;
                let zp = match zp_kind {
                    0 => 0,
                    1 => 128,
                    _ => rng.below(256) as i32,
                };
                let w = QuantizedWeight::from_codes(codes.clone(), &[o, k], &[0.1]).unwrap();
                let want = naive(&x, zp, &codes, o, k);
                for path in paths() {
                    if path == Path::Avx2Madd && amax > 127 {
                        continue;
                    }
                    let got = gemm_rows(path, &x, zp, w.packed());
                    assert_eq!(got, want, "{path:?} m={m} k={k} o={o} amax={amax} zp={zp}");
                }
                let auto = gemm_u8_i8(&x, zp, &w, Kernel::Auto).unwrap();
                assert_eq!(auto, want);
            }
        }
    }

    #[test]
    fn saturation_prone_extremes() {
        // Every product at its extreme: x = 255 / 127 against w = -128 / 127.
        for &(xv, wv) in &[
            (255u8, -128i8),
            (255, 127),
            (127, -128),
            (127, 127),
            (0, -128),
        ] {
            let (m, k, o) = (5, 37, 6);
            let x = vec![xv; m * k];
            let codes = vec![wv; o * k];
            let w = QuantizedWeight::from_codes(codes.clone(), &[o, k], &[1.0]).unwrap();
            for zp in [0, 128, 255] {
                let want = naive(&x, zp, &codes, o, k);
                for path in paths() {
                    if path == Path::Avx2Madd && xv > 127 {
                        continue;
                    }
                    assert_eq!(gemm_rows(path, &x, zp, w.packed()), want, "{path:?}");
                }
                assert_eq!(gemm_u8_i8(&x, zp, &w, Kernel::Auto).unwrap(), want);
            }
        }
        // The saturating path really would be wrong on full-range codes: the kernel choice
        // must avoid it.
        if has_avx2() {
            assert_eq!(Kernel::Avx2.path(255).unwrap(), Path::Avx2Wide);
            assert_eq!(Kernel::Avx2.path(127).unwrap(), Path::Avx2Madd);
            // One position (dot products) and 8 positions (tiles).
            for (m, k) in [(1, 32), (8, 8)] {
                let x = vec![255u8; m * k];
                let codes = vec![-128i8; k];
                let w = QuantizedWeight::from_codes(codes.clone(), &[1, k], &[1.0]).unwrap();
                let sat = gemm_rows(Path::Avx2Madd, &x, 0, w.packed());
                assert_ne!(sat, naive(&x, 0, &codes, 1, k), "m = {m}");
            }
        }
    }

    #[test]
    fn longest_rows_stay_exact() {
        let k = MAX_ROW_LEN;
        let x = vec![255u8; k];
        let codes = vec![-128i8; k];
        let w = QuantizedWeight::from_codes(codes.clone(), &[1, k], &[1.0]).unwrap();
        let want = naive(&x, 0, &codes, 1, k);
        for path in paths() {
            if path != Path::Avx2Madd {
                assert_eq!(gemm_rows(path, &x, 0, w.packed()), want, "{path:?}");
            }
        }
        assert!(QuantizedWeight::from_codes(vec![0; k + 1], &[1, k + 1], &[1.0]).is_err());
    }

    #[test]
    fn parallel_blocks_match() {
        let mut rng = Lcg(7);
        let (m, k, o) = (100, 301, 150);
        let x: Vec<u8> = (0..m * k).map(|_| rng.below(256) as u8).collect();
        let codes: Vec<i8> = (0..o * k).map(|_| rng.below(256) as u8 as i8).collect();
        let w = QuantizedWeight::from_codes(codes.clone(), &[o, k], &[0.1]).unwrap();
        let want = naive(&x, 77, &codes, o, k);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for path in paths() {
            let x = if path == Path::Avx2Madd {
                x.iter().map(|&v| v / 2).collect()
            } else {
                x.clone()
            };
            let want = if path == Path::Avx2Madd {
                naive(&x, 77, &codes, o, k)
            } else {
                want.clone()
            };
            let got = pool.install(|| gemm_rows(path, &x, 77, w.packed()));
            assert_eq!(got, want, "{path:?}");
        }
    }

    #[test]
    fn bad_arguments() {
        let w = QuantizedWeight::from_codes(vec![1, 2, 3, 4], &[2, 2], &[0.1]).unwrap();
        assert!(gemm_u8_i8(&[1, 2, 3], 0, &w, Kernel::Auto).is_err());
        assert!(gemm_u8_i8(&[1, 2], 256, &w, Kernel::Auto).is_err());
        assert_eq!(
            gemm_u8_i8(&[], 0, &w, Kernel::Auto).unwrap(),
            Vec::<i32>::new()
        );
        assert_eq!(Kernel::Portable.resolved(), Kernel::Portable);
        assert!(Kernel::Auto.is_available());
    }
}
