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
//! - AVX-512 VNNI (`vpdpbusd`: 4 u8 x i8 products summed straight into an i32 lane, exact
//!   for any codes): tiles of 8 weight rows x 32 positions ([`vnni`]). Chosen first where the
//!   CPU has it.
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

mod pack;
mod portable;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod vnni;
#[cfg(target_arch = "x86_64")]
mod x86;

pub(crate) use pack::{PackedWeight, Panel};
use portable::portable;

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
/// `Auto`, the choice of the int8 layers, takes the best kernel the CPU has (AVX-512 VNNI,
/// then AVX2, then portable). The environment variable `QAT_INT8_KERNEL` caps it for the
/// whole process (read once): `portable`, `avx2` or `avx512vnni` (e.g. to measure the AVX2
/// path on a VNNI machine); any other value makes every `Auto` product an error.
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
    /// AVX-512 VNNI (errors where the CPU lacks AVX-512 F, BW, VL or VNNI): `vpdpbusd`, any
    /// activation codes.
    Avx512Vnni,
}

impl Kernel {
    /// Whether this kernel can run on this CPU.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Auto | Kernel::Portable => true,
            Kernel::Avx2 => has_avx2(),
            Kernel::Avx512Vnni => has_vnni(),
        }
    }

    /// The kernel `Auto` stands for on this CPU, under the `QAT_INT8_KERNEL` cap when it
    /// holds a valid name (others are returned as they are).
    pub fn resolved(self) -> Kernel {
        match self {
            Kernel::Auto => {
                let cap = match auto_cap() {
                    Ok(Some(k)) => k,
                    _ => Kernel::Avx512Vnni,
                };
                [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Portable]
                    .into_iter()
                    .find(|&k| rank(k) <= rank(cap) && k.is_available())
                    .unwrap_or(Kernel::Portable)
            }
            k => k,
        }
    }

    /// The code path for activations whose largest code is `max_code`.
    pub(crate) fn path(self, max_code: u8) -> Result<Path> {
        if self == Kernel::Auto {
            auto_cap()?;
        }
        match self.resolved() {
            Kernel::Avx2 if !has_avx2() => Err(Error::config(
                "the AVX2 int8 kernel was asked for on a CPU without AVX2",
                "use Kernel::Auto or Kernel::Portable",
            )),
            Kernel::Avx512Vnni if !has_vnni() => Err(Error::config(
                "the AVX-512 VNNI int8 kernel was asked for on a CPU without AVX-512 VNNI",
                "use Kernel::Auto, Kernel::Avx2 or Kernel::Portable",
            )),
            Kernel::Avx512Vnni => Ok(Path::Vnni),
            Kernel::Avx2 if max_code <= 127 => Ok(Path::Avx2Madd),
            Kernel::Avx2 => Ok(Path::Avx2Wide),
            _ => Ok(Path::Portable),
        }
    }
}

/// Kernels by speed, for the `QAT_INT8_KERNEL` cap.
fn rank(k: Kernel) -> u8 {
    match k {
        Kernel::Portable => 0,
        Kernel::Avx2 => 1,
        Kernel::Avx512Vnni | Kernel::Auto => 2,
    }
}

/// The `QAT_INT8_KERNEL` cap on `Auto`, read once: `None` when unset, an error when it names
/// no kernel.
fn auto_cap() -> Result<Option<Kernel>> {
    static CAP: OnceLock<std::result::Result<Option<Kernel>, String>> = OnceLock::new();
    let cap = CAP.get_or_init(|| match std::env::var("QAT_INT8_KERNEL") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) => parse_cap(&v).map(Some).ok_or(v),
        Err(std::env::VarError::NotUnicode(v)) => Err(v.to_string_lossy().into_owned()),
    });
    cap.clone().map_err(|v| {
        Error::config(
            format!("QAT_INT8_KERNEL={v:?} names no int8 kernel"),
            "set it to portable, avx2 or avx512vnni, or unset it",
        )
    })
}

/// The kernel a `QAT_INT8_KERNEL` value names.
fn parse_cap(v: &str) -> Option<Kernel> {
    match v {
        "portable" => Some(Kernel::Portable),
        "avx2" => Some(Kernel::Avx2),
        "avx512vnni" => Some(Kernel::Avx512Vnni),
        _ => None,
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
    /// AVX-512 VNNI `vpdpbusd`: any activation codes.
    Vnni,
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

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An error for operands that do not fit together: a bug in the int8 layer that called the
/// kernels (the layers check shapes first), reported instead of reading out of bounds.
fn mismatch(what: String) -> Error {
    Error::tensor(
        format!("int8 kernel operands do not fit: {what}"),
        "this is a bug in qat-core's int8 layers; please report it with the layer's shapes",
    )
}

/// Checks, in O(1), what the kernels' bounds rest on: the rows lie inside the weight, the
/// panel was packed for the weight's row length, and `corr` and `out` hold the block.
fn check_block(
    w: &PackedWeight,
    rows: &Range<usize>,
    corr: &[i32],
    panel: &Panel,
    out: &[i32],
) -> Result<()> {
    let p = panel.positions;
    if rows.end > w.rows {
        return Err(mismatch(format!(
            "rows {rows:?} of a {}-row weight",
            w.rows
        )));
    }
    if panel.kgroups * KG != w.kp {
        return Err(mismatch(format!(
            "a panel of {} k-groups for rows of {} codes",
            panel.kgroups, w.row_len
        )));
    }
    if corr.len() < rows.len() || rows.len().checked_mul(p).is_none_or(|n| out.len() < n) {
        return Err(mismatch(format!(
            "{} corrections and {} outputs for {} rows x {p} positions",
            corr.len(),
            out.len(),
            rows.len()
        )));
    }
    Ok(())
}

/// `out[i][p] = sum_k (x[p][k] - x_zp) * w[rows.start + i][k]` for every position of the
/// panel: `out` is `(rows.len(), panel positions)`, row-major. An error (never an
/// out-of-bounds access) when the operands do not fit together.
pub(crate) fn gemm(
    path: Path,
    w: &PackedWeight,
    rows: Range<usize>,
    panel: &Panel,
    x_zp: i32,
    out: &mut [i32],
) -> Result<()> {
    let p = panel.positions;
    let nrows = rows.len();
    if nrows == 0 || p == 0 {
        return Ok(());
    }
    if rows.end > w.rows || out.len() < nrows * p {
        return Err(mismatch(format!(
            "rows {rows:?} of a {}-row weight into {} outputs for {p} positions",
            w.rows,
            out.len()
        )));
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
            .try_for_each(|(i, (out, corr))| {
                let r0 = rows.start + i * ob;
                let r1 = (r0 + ob).min(rows.end);
                run_block(path, w, r0..r1, corr, panel, out)
            })
    } else {
        run_block(path, w, rows, &corr, panel, out)
    }
}

/// A requantization a kernel can apply to its sums before they leave registers (the
/// fbgemm/x86 arithmetic: no int32 bias): per row `o` of the product, `code =
/// low_byte(bits((clamp((acc as f32 * mult[o] + bias[o]) * inv_scale, lo, hi) + MAGIC) +
/// zero_point))`, as `requant::requant_row` computes it.
pub(crate) struct Fused<'a> {
    pub(crate) mult: &'a [f32],
    pub(crate) bias: &'a [f32],
    pub(crate) inv_scale: f32,
    pub(crate) zero_point: f32,
    pub(crate) lo: f32,
    pub(crate) hi: f32,
}

/// [`gemm`] with the requantization fused into the kernel: `out[i][p]` is the code of
/// `sum_k (x[p][k] - x_zp) * w[rows.start + i][k]` under `f` (row `i` of `f`). Runs only
/// where a kernel can (AVX-512 VNNI or saturating AVX2, a row length of one k-block) and returns whether it
/// ran; the caller computes the sums and requantizes them otherwise. An error (never an
/// out-of-bounds access) when the operands do not fit together.
pub(crate) fn gemm_codes(
    path: Path,
    w: &PackedWeight,
    rows: Range<usize>,
    panel: &Panel,
    x_zp: i32,
    f: &Fused,
    out: &mut [u8],
) -> Result<bool> {
    let fits = match path {
        Path::Vnni => has_vnni(),
        Path::Avx2Madd => has_avx2(),
        _ => false,
    };
    if !fits || w.kp / KG > K_BLOCK {
        return Ok(false);
    }
    let p = panel.positions;
    let nrows = rows.len();
    if nrows == 0 || p == 0 {
        return Ok(true);
    }
    if rows.end > w.rows || out.len() < nrows * p || f.mult.len() < nrows || f.bias.len() < nrows {
        return Err(mismatch(format!(
            "rows {rows:?} of a {}-row weight into {} codes for {p} positions, {} factors",
            w.rows,
            out.len(),
            f.mult.len().min(f.bias.len())
        )));
    }
    let corr: Vec<i32> = rows
        .clone()
        .map(|o| x_zp.wrapping_mul(w.row_sums[o]))
        .collect();
    let run = |r: Range<usize>, corr: &[i32], out: &mut [u8], i0: usize| -> Result<()> {
        let n = r.len();
        if r.end > w.rows || corr.len() < n || out.len() < n * p || panel.kgroups * KG != w.kp {
            return Err(mismatch(format!("a fused block of rows {r:?}")));
        }
        let fr = Fused {
            mult: &f.mult[i0..i0 + n],
            bias: &f.bias[i0..i0 + n],
            ..*f
        };
        // SAFETY: the path's features are present (AVX-512F/BW/VL and VNNI, or AVX2 for
        // the saturating kernel, whose activations the path was chosen for) and the row
        // length is one k-block (both checked at the top of `gemm_codes`); just above, in O(1): the rows lie
        // inside the weight, the panel holds the weight's k-groups, `corr` holds a value
        // per row and `out` a code per row and position, `fr` a factor per row.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            if path == Path::Vnni {
                vnni::block(w, r, corr, panel, vnni::Dest::Codes(out, &fr))
            } else {
                x86::block_codes(w, r, corr, panel, out, &fr)
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (fr, corr, out);
        Ok(())
    };
    let threads = rayon::current_num_threads();
    let work = nrows * p * w.kp;
    if threads > 1 && work >= PAR_WORK && nrows > O_TILE {
        let blocks = (4 * threads).min(nrows.div_ceil(O_TILE));
        let ob = nrows.div_ceil(blocks).next_multiple_of(O_TILE);
        out[..nrows * p]
            .par_chunks_mut(ob * p)
            .zip(corr.par_chunks(ob))
            .enumerate()
            .try_for_each(|(i, (out, corr))| {
                let r0 = rows.start + i * ob;
                let r1 = (r0 + ob).min(rows.end);
                run(r0..r1, corr, out, i * ob)
            })?;
    } else {
        run(rows.clone(), &corr, out, 0)?;
    }
    Ok(true)
}

/// Positions up to which a product runs as dot products ([`gemv`]): the kernels' tiles of 16
/// positions would mostly compute padding (a linear layer at batch 1 fills one of 16).
pub(crate) const GEMV_MAX: usize = 4;

/// `out[o][p] = sum_k (x[p][k] - x_zp) * w[o][k]` for the few rows of `x` (row-major,
/// `w.row_len` codes each) as one dot product per weight row and position; `out` is
/// `(w.rows, m)`. The same integers as [`gemm`]; an error when `x` is not whole rows or
/// `out` is too short.
pub(crate) fn gemv(
    path: Path,
    w: &PackedWeight,
    x: &[u8],
    x_zp: i32,
    out: &mut [i32],
) -> Result<()> {
    let k = w.row_len;
    if k == 0 {
        out.fill(0);
        return Ok(());
    }
    let m = x.len() / k;
    if x.len() != m * k || out.len() < w.rows * m {
        return Err(mismatch(format!(
            "{} codes in rows of {k} into {} outputs for {} weight rows",
            x.len(),
            out.len(),
            w.rows
        )));
    }
    if m == 0 {
        return Ok(());
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
    Ok(())
}

/// `sum_k x[k] * w[k]`, exact (wrapping) in i32.
fn dot(path: Path, w: &[i8], x: &[u8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if path == Path::Vnni && has_vnni() {
        // SAFETY: AVX-512F/BW and VNNI are present (checked just above, at run time);
        // `vnni::dot` reads only inside both slices.
        return unsafe { vnni::dot(w, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(path, Path::Avx2Madd | Path::Avx2Wide) && has_avx2() {
        // SAFETY: AVX2 is present (checked just above, at run time); `x86::dot` reads only
        // the first `min(w.len(), x.len())` elements of each slice.
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
) -> Result<()> {
    check_block(w, &rows, corr, panel, out)?;
    #[cfg(target_arch = "x86_64")]
    if path == Path::Vnni && has_vnni() {
        // SAFETY: AVX-512F/BW/VL and VNNI are present (checked just above, at run time), and
        // `check_block` has just checked in O(1) what `vnni::block` reads and writes rests
        // on, as for the AVX2 block below.
        unsafe { vnni::block(w, rows, corr, panel, vnni::Dest::Sums(out)) };
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(path, Path::Avx2Madd | Path::Avx2Wide) && has_avx2() {
        let wide = path == Path::Avx2Wide;
        // SAFETY: AVX2 is present (checked just above, at run time), and `check_block` has
        // just checked in O(1) what `x86::block` reads and writes rests on: `rows` lie
        // inside the weight, the panel holds the weight's `kp / 4` k-groups (each of
        // `stride >= positions rounded up to 16` positions, by `Panel::reset`), and `corr`
        // and `out` hold `rows.len()` and `rows.len() * positions` values.
        unsafe { x86::block(w, rows, corr, panel, out, wide) };
        return Ok(());
    }
    portable(w, rows, corr, panel, out);
    Ok(())
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
    gemm_rows(path, x, x_zero_point, w.packed())
}

/// `(m, out)` sums of `m` rows of codes with a given path.
pub(crate) fn gemm_rows(path: Path, x: &[u8], x_zp: i32, w: &PackedWeight) -> Result<Vec<i32>> {
    let m = x.len() / w.row_len;
    let mut acc_t = vec![0i32; w.rows * m];
    if m <= GEMV_MAX {
        gemv(path, w, x, x_zp, &mut acc_t)?;
    } else {
        let panel = Panel::from_rows(x, m, w.row_len);
        gemm(path, w, 0..w.rows, &panel, x_zp, &mut acc_t)?;
    }
    let mut acc = vec![0i32; m * w.rows];
    for (o, row) in acc_t.chunks_exact(m.max(1)).enumerate() {
        for (mi, &v) in row.iter().enumerate() {
            acc[mi * w.rows + o] = v;
        }
    }
    Ok(acc)
}
