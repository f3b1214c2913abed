//! Int8 2-D convolution: im2col on u8 codes, then the integer GEMM, then requantization.

use candle_core::{Tensor, WithDType};
use multiversion::multiversion;
use rayon::prelude::*;

use super::gemm::{gemm, Kernel, Panel, Path};
use super::linear::check_zero_point;
use super::qtensor::{max_code, on_u8};
use super::requant::{Affine, Epilogue, Requant};
use super::weight::QuantizedWeight;
use crate::error::{Error, Result};
use crate::geometry::ConvConfig;

/// Multiply-adds below which the images of a batch run on the calling thread.
const PAR_WORK: usize = 1 << 21;
/// Bytes after the padded image that the 16-wide im2col copies may read (up to about
/// `16 * stride + 16` past the last tap's window).
const SLACK: usize = 96;

/// Int8 2-D convolution (PyTorch's `torch.ao.nn.quantized.Conv2d`, and `ConvReLU2d` with
/// [`Requant::with_relu`]): `x` holds u8 codes `(N, C, H, W)` quantized with `x_scale` /
/// `x_zero_point`, `w` int8 weights `(O, C / groups, kh, kw)`; the result holds the output's
/// u8 codes `(N, O, OH, OW)` on `x`'s device (the work runs on the CPU).
///
/// The input is unfolded (im2col) on its codes, padding with `x_zero_point` so that padded
/// taps contribute `x - x_zp = 0`, exactly as zero padding of the float input; then each
/// group's `acc = sum (x_q - x_zp) * w_q` is computed exactly in i32 and requantized as
/// [`Requant`] says, with `bias` (one per output channel) in float. `conv` gives padding,
/// stride and dilation (the same along both dims) and groups.
///
/// Errors when `x` is not a 4-D `U8` tensor, when the weight is not 4-D or its shape does
/// not fit `x` and the group count, when the kernel does not fit the padded input, when the
/// bias does not have one value per output channel, or on an invalid input scale or zero
/// point.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::nn::ConvConfig;
/// use qat_core::quantized::{quantized_conv2d, QuantizedWeight, Requant};
/// // A 3x3 box filter (codes 1, scale 0.5) over a 1x1x2x2 input with zero point 5.
/// let w = QuantizedWeight::from_codes(vec![1; 9], &[1, 1, 3, 3], &[0.5])?;
/// let x = Tensor::new(&[[[[7u8, 5], [5, 9]]]], &Device::Cpu)?; // (2, 0, 0, 4) above zp
/// let conv = ConvConfig { padding: 1, ..Default::default() };
/// let out = Requant::new(1.0, 0, 0, 255)?;
/// let y = quantized_conv2d(&x, 1.0, 5, &w, None, &conv, &out)?;
/// // Every output window covers the whole input: (2 + 4) * 0.5 = 3.
/// assert_eq!(y.dims(), &[1, 1, 2, 2]);
/// assert_eq!(y.flatten_all()?.to_vec1::<u8>()?, vec![3, 3, 3, 3]);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn quantized_conv2d(
    x: &Tensor,
    x_scale: f32,
    x_zero_point: i32,
    w: &QuantizedWeight,
    bias: Option<&[f32]>,
    conv: &ConvConfig,
    out: &Requant,
) -> Result<Tensor> {
    let plan = out.plan(x_scale, w, bias)?;
    conv_with(x, x_zero_point, w, conv, &plan)
}

/// The float values an int8 convolution requantizes, before rounding: per output channel
/// `c`, `acc * (x_scale * w_scale[c]) + bias[c]` in f32, `(N, O, OH, OW)`, with the exact
/// i32 `acc` of [`quantized_conv2d`] (same inputs, same errors). Fake-quantizing it with
/// the output's qparams and range gives [`quantized_conv2d`]'s codes exactly.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::nn::ConvConfig;
/// use qat_core::quantized::{conv2d_prerequant, QuantizedWeight};
/// let w = QuantizedWeight::from_codes(vec![1; 4], &[1, 1, 2, 2], &[0.5])?;
/// let x = Tensor::new(&[[[[7u8, 5], [5, 9]]]], &Device::Cpu)?;
/// let y = conv2d_prerequant(&x, 1.0, 5, &w, &[0.25], &ConvConfig::default())?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![3.25]);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn conv2d_prerequant(
    x: &Tensor,
    x_scale: f32,
    x_zero_point: i32,
    w: &QuantizedWeight,
    bias: &[f32],
    conv: &ConvConfig,
) -> Result<Tensor> {
    let affine = Affine::new(x_scale, w, Some(bias))?;
    conv_with(x, x_zero_point, w, conv, &affine)
}

/// An int8 convolution with an int32 bias added to the sums (qnnpack's arithmetic; zeros for
/// fbgemm/x86): requantized codes with `out`, or the f32 values it rounds without.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_int(
    x: &Tensor,
    x_scale: f32,
    x_zero_point: i32,
    w: &QuantizedWeight,
    bias: &[f32],
    int_bias: &[i32],
    conv: &ConvConfig,
    out: Option<&Requant>,
) -> Result<Tensor> {
    let affine = Affine::new(x_scale, w, Some(bias))?.with_int_bias(int_bias)?;
    match out {
        Some(r) => conv_with(x, x_zero_point, w, conv, &r.plan_with(affine)),
        None => conv_with(x, x_zero_point, w, conv, &affine),
    }
}

/// The int8 convolution up to its i32 sums, then `epi` on each output channel.
fn conv_with<E: Epilogue>(
    x: &Tensor,
    x_zero_point: i32,
    w: &QuantizedWeight,
    conv: &ConvConfig,
    epi: &E,
) -> Result<Tensor> {
    let g = Geometry::new(x.dims(), w.shape(), conv)?;
    run_with(x, x_zero_point, w, &g, epi, Kernel::Auto)
}

/// [`conv_with`] for a 1-D convolution: `x` `(N, C, L)` and the weight `(O, C / groups, k)`
/// run as a 2-D convolution over `(N, C, 1, L)` with a `(O, C / groups, 1, k)` kernel,
/// padded and strided along the width only; the result is `(N, O, OL)`.
pub(super) fn conv1d_with<E: Epilogue>(
    x: &Tensor,
    x_zero_point: i32,
    w: &QuantizedWeight,
    conv: &ConvConfig,
    epi: &E,
) -> Result<Tensor> {
    let g = Geometry::new_1d(x.dims(), w.shape(), conv)?;
    run_with(x, x_zero_point, w, &g, epi, Kernel::Auto)
}

fn run_with<E: Epilogue>(
    x: &Tensor,
    x_zero_point: i32,
    w: &QuantizedWeight,
    g: &Geometry,
    epi: &E,
    kernel: Kernel,
) -> Result<Tensor> {
    let g = *g;
    check_zero_point(x_zero_point)?;
    let y = on_u8(x, g.what, |xs| {
        let mut top = max_code(xs);
        if g.pad_h > 0 || g.pad_w > 0 {
            top = top.max(x_zero_point as u8);
        }
        let path = kernel.path(top)?;
        let zero = <E::Out as WithDType>::from_f64(0.0);
        let mut y = vec![zero; g.batch * g.out_channels * g.positions()];
        let image_in = g.groups * g.cg * g.h * g.w;
        let image_out = g.out_channels * g.positions();
        if image_out == 0 {
            return Ok(y);
        }
        let run = |scratch: &mut Scratch, (n, y): (usize, &mut [E::Out])| {
            let xn = &xs[n * image_in..(n + 1) * image_in];
            conv_image(path, &g, xn, x_zero_point as u8, w, epi, scratch, y)
        };
        if g.batch > 1 && g.work() >= PAR_WORK {
            y.par_chunks_mut(image_out)
                .enumerate()
                .try_for_each_init(Scratch::default, run)?;
        } else {
            let mut scratch = Scratch::default();
            for item in y.chunks_mut(image_out).enumerate() {
                run(&mut scratch, item)?;
            }
        }
        Ok::<_, Error>(y)
    })??;
    Ok(if g.one_d {
        Tensor::from_vec(y, (g.batch, g.out_channels, g.ow), x.device())?
    } else {
        Tensor::from_vec(y, (g.batch, g.out_channels, g.oh, g.ow), x.device())?
    })
}

/// Shapes of one convolution call (a 1-D one as 2-D with height 1).
#[derive(Clone, Copy, Debug)]
struct Geometry {
    /// The input as error messages name it.
    what: &'static str,
    /// A 1-D convolution: `(N, O, OW)` out.
    one_d: bool,
    batch: usize,
    groups: usize,
    /// Input channels per group.
    cg: usize,
    h: usize,
    w: usize,
    out_channels: usize,
    kh: usize,
    kw: usize,
    pad_h: usize,
    pad_w: usize,
    stride_h: usize,
    stride_w: usize,
    dilation: usize,
    oh: usize,
    ow: usize,
    /// Padded input height and width.
    hp: usize,
    wp: usize,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], c: &ConvConfig) -> Result<Self> {
        let &[batch, channels, h, wd] = x else {
            return Err(Error::tensor(
                format!("an int8 conv2d got an input of shape {x:?}"),
                "feed a 4-D (N, C, H, W) tensor of u8 codes",
            ));
        };
        let &[out_channels, cg, kh, kw] = w else {
            return Err(Error::tensor(
                format!("a conv2d weight of shape {w:?}"),
                "give a 4-D weight (out_channels, in_channels / groups, kh, kw)",
            ));
        };
        Self::build(
            "the int8 conv2d input",
            [batch, channels, h, wd],
            [out_channels, cg, kh, kw],
            c,
            (c.padding, c.padding),
            (c.stride, c.stride),
        )
    }

    fn new_1d(x: &[usize], w: &[usize], c: &ConvConfig) -> Result<Self> {
        let &[batch, channels, l] = x else {
            return Err(Error::tensor(
                format!("an int8 conv1d got an input of shape {x:?}"),
                "feed a 3-D (N, C, L) tensor of u8 codes",
            ));
        };
        let &[out_channels, cg, k] = w else {
            return Err(Error::tensor(
                format!("a conv1d weight of shape {w:?}"),
                "give a 3-D weight (out_channels, in_channels / groups, k)",
            ));
        };
        let mut g = Self::build(
            "the int8 conv1d input",
            [batch, channels, 1, l],
            [out_channels, cg, 1, k],
            c,
            (0, c.padding),
            (1, c.stride),
        )?;
        g.one_d = true;
        Ok(g)
    }

    fn build(
        what: &'static str,
        [batch, channels, h, wd]: [usize; 4],
        [out_channels, cg, kh, kw]: [usize; 4],
        c: &ConvConfig,
        (pad_h, pad_w): (usize, usize),
        (stride_h, stride_w): (usize, usize),
    ) -> Result<Self> {
        if c.groups == 0 || c.stride == 0 || c.dilation == 0 {
            return Err(Error::config(
                format!(
                    "an int8 convolution with groups {}, stride {}, dilation {}",
                    c.groups, c.stride, c.dilation
                ),
                "use groups, stride and dilation >= 1",
            ));
        }
        if cg * c.groups != channels || out_channels % c.groups != 0 {
            return Err(Error::tensor(
                format!(
                    "a weight of shape {:?} with {} groups does not fit an input with \
                     {channels} channels",
                    [out_channels, cg, kh, kw],
                    c.groups
                ),
                "the input needs in_channels / groups * groups channels and the output \
                 channels must divide by groups",
            ));
        }
        if kh == 0 || kw == 0 {
            return Err(Error::tensor(
                "a convolution kernel with no taps",
                "use kernel sizes >= 1",
            ));
        }
        let (hp, wp) = (h + 2 * pad_h, wd + 2 * pad_w);
        let (span_h, span_w) = (c.dilation * (kh - 1) + 1, c.dilation * (kw - 1) + 1);
        if hp < span_h || wp < span_w {
            return Err(Error::tensor(
                format!(
                    "a {kh}x{kw} kernel with dilation {} does not fit the padded input \
                     {hp}x{wp}",
                    c.dilation
                ),
                "use a larger input or more padding",
            ));
        }
        Ok(Geometry {
            what,
            one_d: false,
            batch,
            groups: c.groups,
            cg,
            h,
            w: wd,
            out_channels,
            kh,
            kw,
            pad_h,
            pad_w,
            stride_h,
            stride_w,
            dilation: c.dilation,
            oh: (hp - span_h) / stride_h + 1,
            ow: (wp - span_w) / stride_w + 1,
            hp,
            wp,
        })
    }

    fn positions(&self) -> usize {
        self.oh * self.ow
    }

    fn row_len(&self) -> usize {
        self.cg * self.kh * self.kw
    }

    fn work(&self) -> usize {
        self.batch * self.out_channels * self.positions() * self.row_len()
    }
}

/// Per-thread buffers reused from image to image.
#[derive(Default)]
struct Scratch {
    padded: Vec<u8>,
    panel: Panel,
    acc: Vec<i32>,
    /// Depthwise sums over the padded width.
    wide: Vec<i32>,
}

/// One image: per group, pad, unfold, multiply, requantize into `y` (`(O, OH, OW)`).
#[allow(clippy::too_many_arguments)]
fn conv_image<E: Epilogue>(
    path: Path,
    g: &Geometry,
    x: &[u8],
    x_zp: u8,
    w: &QuantizedWeight,
    epi: &E,
    s: &mut Scratch,
    y: &mut [E::Out],
) -> Result<()> {
    let p = g.positions();
    let og = g.out_channels / g.groups;
    let group_in = g.cg * g.h * g.w;
    if g.cg == 1 && og == 1 {
        // Depthwise: one channel in, one out per group. Direct sums over the taps, no
        // unfolding and no one-row GEMM per channel.
        let taps = g.kh * g.kw;
        for gi in 0..g.groups {
            pad_group(
                g,
                &x[gi * group_in..(gi + 1) * group_in],
                x_zp,
                &mut s.padded,
            );
            s.acc.clear();
            s.acc.resize(p, 0);
            let wc = &w.codes()[gi * taps..(gi + 1) * taps];
            depthwise_sums(g, &s.padded, x_zp as i32, wc, &mut s.acc, &mut s.wide);
            epi.row(gi, &s.acc, &mut y[gi * p..(gi + 1) * p]);
        }
        return Ok(());
    }
    for gi in 0..g.groups {
        pad_group(
            g,
            &x[gi * group_in..(gi + 1) * group_in],
            x_zp,
            &mut s.padded,
        );
        s.panel.reset(p, g.row_len());
        im2col(g, &s.padded, &mut s.panel);
        let rows = gi * og..(gi + 1) * og;
        let y_rows = &mut y[rows.start * p..rows.end * p];
        if epi.gemm_into(
            path,
            w.packed(),
            rows.clone(),
            &s.panel,
            x_zp as i32,
            y_rows,
        )? {
            continue;
        }
        s.acc.clear();
        s.acc.resize(og * p, 0);
        gemm(
            path,
            w.packed(),
            rows.clone(),
            &s.panel,
            x_zp as i32,
            &mut s.acc,
        )?;
        for (o, acc) in rows.zip(s.acc.chunks_exact(p)) {
            epi.row(o, acc, &mut y[o * p..(o + 1) * p]);
        }
    }
    Ok(())
}

/// One depthwise channel: `acc[oy * ow + ox] = sum over taps (x - x_zp) * w`, `padded` one
/// channel bordered with the zero point (`(hp, wp)`), `w` its `kh * kw` weight codes, exact
/// in i32 (|term| <= 255 * 128, fewer than 2^16 taps). At stride 1 every tap is one long run
/// over the padded width (`wide`, `oh * wp` sums whose last `wp - ow` columns of each row are
/// dropped), so the inner loop vectorizes; other strides go row by row.
fn depthwise_sums(
    g: &Geometry,
    padded: &[u8],
    x_zp: i32,
    w: &[i8],
    acc: &mut [i32],
    wide: &mut Vec<i32>,
) {
    let (ow, wp) = (g.ow, g.wp);
    if g.stride_h == 1 && g.stride_w == 1 {
        let run = (g.oh - 1) * wp + ow;
        wide.clear();
        wide.resize(run, 0);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let wv = w[ky * g.kw + kx] as i32;
                if wv != 0 {
                    let base = ky * g.dilation * wp + kx * g.dilation;
                    tap_run(&padded[base..base + run], x_zp, wv, wide);
                }
            }
        }
        for (a, src) in acc.chunks_exact_mut(ow).zip(wide.chunks(wp)) {
            a.copy_from_slice(&src[..ow]);
        }
        return;
    }
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let wv = w[ky * g.kw + kx] as i32;
            if wv == 0 {
                continue;
            }
            let base = ky * g.dilation * wp + kx * g.dilation;
            for (oy, a) in acc.chunks_exact_mut(ow).enumerate() {
                let row = base + oy * g.stride_h * wp;
                for (ox, a) in a.iter_mut().enumerate() {
                    *a += (padded[row + ox * g.stride_w] as i32 - x_zp) * wv;
                }
            }
        }
    }
}

/// `acc[i] += (x[i] - x_zp) * w` over a run (one depthwise tap at stride 1).
#[multiversion(targets("x86_64+avx2"))]
fn tap_run(x: &[u8], x_zp: i32, w: i32, acc: &mut [i32]) {
    for (a, &xv) in acc.iter_mut().zip(x) {
        *a += (xv as i32 - x_zp) * w;
    }
}

/// Copies one group's channels into `(cg, hp, wp)` bordered with the zero point (plus
/// `SLACK` bytes for the 16-wide reads).
fn pad_group(g: &Geometry, x: &[u8], x_zp: u8, padded: &mut Vec<u8>) {
    padded.clear();
    padded.resize(g.cg * g.hp * g.wp + SLACK, x_zp);
    if g.w == 0 {
        return;
    }
    for (c, plane) in x.chunks_exact(g.h * g.w).enumerate() {
        for (iy, row) in plane.chunks_exact(g.w).enumerate() {
            let at = (c * g.hp + iy + g.pad_h) * g.wp + g.pad_w;
            copy_row(&mut padded[at..at + g.w], row);
        }
    }
}

/// `dst.copy_from_slice(src)` for the short rows of an image (7 to a few hundred bytes) in
/// fixed-size moves: rows of 8 to 32 bytes as two possibly overlapping 8- or 16-byte moves
/// (no loop, which the compiler would turn back into a `memcpy` call: a call per row cost 4%
/// of an int8 MnistNet forward), longer rows 16 bytes at a time with an overlapping last
/// move. Panics (as `copy_from_slice`) if the lengths differ.
#[inline]
fn copy_row(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_row: lengths");
    let n = src.len();
    fn mv<const K: usize>(dst: &mut [u8], src: &[u8], at: usize) {
        let s: [u8; K] = src[at..at + K].try_into().expect("K bytes");
        dst[at..at + K].copy_from_slice(&s);
    }
    match n {
        0..8 => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = *s;
            }
        }
        8..16 => {
            mv::<8>(dst, src, 0);
            mv::<8>(dst, src, n - 8);
        }
        16..=32 => {
            mv::<16>(dst, src, 0);
            mv::<16>(dst, src, n - 16);
        }
        _ => {
            let mut at = 0;
            while at + 16 < n {
                mv::<16>(dst, src, at);
                at += 16;
            }
            mv::<16>(dst, src, n - 16);
        }
    }
}

/// Unfolds a padded group into the panel: k-group `kg` holds the taps `4 kg .. 4 kg + 4` of
/// `k = (c * kh + ky) * kw + kx` (the weight's row order); taps past the row length repeat
/// the last one (their weights are zero).
fn im2col(g: &Geometry, padded: &[u8], panel: &mut Panel) {
    let k_len = g.row_len();
    let (ow, wp, (sh, sw)) = (g.ow, g.wp, (g.stride_h, g.stride_w));
    let tap = |k: usize| {
        let k = k.min(k_len - 1);
        let (c, ky, kx) = (k / (g.kh * g.kw), (k / g.kw) % g.kh, k % g.kw);
        (c * g.hp + ky * g.dilation) * wp + kx * g.dilation
    };
    let stride = panel.stride();
    // Strides 1 and 2 along the width copy 16 positions at a time: a row may overrun into
    // the next row's place (written just after) or the panel's padding, and read past the
    // last padded row into the SLACK. Both bounds are checked here once.
    #[cfg(target_arch = "x86_64")]
    let fast = {
        let owr = ow.next_multiple_of(16);
        let reads = tap(k_len - 1) + (g.oh - 1) * sh * wp + sw * owr + 16;
        (sw == 1 || sw == 2) && padded.len() >= reads && (g.oh - 1) * ow + owr <= stride
    };
    let words = panel.words_mut();
    for (kg, dst) in words.chunks_exact_mut(stride).enumerate() {
        let offs = [
            tap(4 * kg),
            tap(4 * kg + 1),
            tap(4 * kg + 2),
            tap(4 * kg + 3),
        ];
        #[cfg(target_arch = "x86_64")]
        if fast {
            let rows = Rows {
                oh: g.oh,
                ow,
                row_step: sh * wp,
            };
            // SAFETY: every read is below `offs[j] + (oh - 1) * sh * wp + sw * (ow rounded
            // up to 16) + 16`, at most the largest tap's offset plus that, which was checked
            // above to be <= `padded.len()`; every write is below `(oh - 1) * ow + ow
            // rounded up to 16 <= stride = dst.len()` (checked above).
            unsafe {
                if sw == 1 {
                    rows_stride1(padded.as_ptr(), offs, rows, dst.as_mut_ptr());
                } else {
                    rows_stride2(padded.as_ptr(), offs, rows, dst.as_mut_ptr());
                }
            }
            continue;
        }
        for oy in 0..g.oh {
            let row = oy * sh * wp;
            let srcs = offs.map(|o| &padded[o + row..]);
            for (ox, v) in dst[oy * ow..(oy + 1) * ow].iter_mut().enumerate() {
                let at = ox * sw;
                *v = u32::from_ne_bytes([srcs[0][at], srcs[1][at], srcs[2][at], srcs[3][at]]);
            }
        }
    }
}

/// The output rows of one k-group: `oh` rows of `ow` positions, input rows `row_step`
/// bytes apart.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Rows {
    oh: usize,
    ow: usize,
    row_step: usize,
}

/// Interleaves four vectors of 16 codes (one per tap of a k-group) into the 16 words of 16
/// positions at `out`.
///
/// # Safety
/// `out` must be valid for writes of 16 words.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_kgroup(out: *mut u32, [a, b, c, e]: [std::arch::x86_64::__m128i; 4]) {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of x86_64; `out` holds 16 words (this function's contract).
    unsafe {
        let (ab_lo, ab_hi) = (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b));
        let (ce_lo, ce_hi) = (_mm_unpacklo_epi8(c, e), _mm_unpackhi_epi8(c, e));
        let o = out.cast::<__m128i>();
        _mm_storeu_si128(o, _mm_unpacklo_epi16(ab_lo, ce_lo));
        _mm_storeu_si128(o.add(1), _mm_unpackhi_epi16(ab_lo, ce_lo));
        _mm_storeu_si128(o.add(2), _mm_unpacklo_epi16(ab_hi, ce_hi));
        _mm_storeu_si128(o.add(3), _mm_unpackhi_epi16(ab_hi, ce_hi));
    }
}

/// Width-stride-1 rows of one k-group: `d[oy * ow + ox]` = the bytes at
/// `src + offs[j] + oy * row_step + ox`, j = 0..4, in memory order, 16 positions per step
/// (SSE2 byte interleaves).
///
/// # Safety
/// Reads of 16 bytes at `src + offs[j] + oy * row_step + ox` and writes of 16 words at
/// `d + oy * ow + ox`, for `oy < oh` and `ox` in steps of 16 below `ow`, must be in bounds.
#[cfg(target_arch = "x86_64")]
unsafe fn rows_stride1(src: *const u8, offs: [usize; 4], r: Rows, d: *mut u32) {
    // SAFETY: SSE2 is part of x86_64; the reads and writes are in bounds (this function's
    // contract).
    unsafe {
        use std::arch::x86_64::*;
        for oy in 0..r.oh {
            let s = offs.map(|o| src.add(o + oy * r.row_step));
            let out = d.add(oy * r.ow);
            let mut ox = 0;
            while ox < r.ow {
                let v = s.map(|p| _mm_loadu_si128(p.add(ox).cast()));
                store_kgroup(out.add(ox), v);
                ox += 16;
            }
        }
    }
}

/// Width-stride-2 rows of one k-group: as [`rows_stride1`] with the bytes at `src + offs[j]
/// + oy * row_step + 2 ox`: 32 bytes loaded per tap and step, the even ones kept.
///
/// # Safety
/// Reads of 32 bytes at `src + offs[j] + oy * row_step + 2 ox` and writes of 16 words at
/// `d + oy * ow + ox`, for `oy < oh` and `ox` in steps of 16 below `ow`, must be in bounds.
#[cfg(target_arch = "x86_64")]
unsafe fn rows_stride2(src: *const u8, offs: [usize; 4], r: Rows, d: *mut u32) {
    // SAFETY: SSE2 is part of x86_64; the reads and writes are in bounds (this function's
    // contract).
    unsafe {
        use std::arch::x86_64::*;
        let even = _mm_set1_epi16(0x00ff);
        for oy in 0..r.oh {
            let s = offs.map(|o| src.add(o + oy * r.row_step));
            let out = d.add(oy * r.ow);
            let mut ox = 0;
            while ox < r.ow {
                let v = s.map(|p| {
                    let lo = _mm_loadu_si128(p.add(2 * ox).cast());
                    let hi = _mm_loadu_si128(p.add(2 * ox + 16).cast());
                    _mm_packus_epi16(_mm_and_si128(lo, even), _mm_and_si128(hi, even))
                });
                store_kgroup(out.add(ox), v);
                ox += 16;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    #[test]
    fn copy_row_copies_every_length() {
        for n in 0..=70usize {
            let src: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
            // Bytes around the destination stay as they were.
            let mut buf = vec![0xAAu8; n + 4];
            copy_row(&mut buf[2..2 + n], &src);
            assert_eq!(&buf[2..2 + n], &src[..], "n = {n}");
            assert!(
                buf[..2].iter().chain(&buf[2 + n..]).all(|&b| b == 0xAA),
                "n = {n}"
            );
        }
    }
    use candle_core::Device;

    struct Case {
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        o: usize,
        k: (usize, usize),
        conv: ConvConfig,
        amax: u32,
        xzp: i32,
        relu: bool,
    }

    /// Direct convolution in i64, then the requant formula.
    fn reference(
        t: &Case,
        x: &[u8],
        w: &QuantizedWeight,
        bias: &[f32],
        rq: &Requant,
        xs: f32,
    ) -> (Vec<usize>, Vec<u8>) {
        let cv = &t.conv;
        let (kh, kw) = t.k;
        let cg = t.c / cv.groups;
        let og = t.o / cv.groups;
        let oh = (t.h + 2 * cv.padding - cv.dilation * (kh - 1) - 1) / cv.stride + 1;
        let ow = (t.w + 2 * cv.padding - cv.dilation * (kw - 1) - 1) / cv.stride + 1;
        let mut y = Vec::new();
        for n in 0..t.n {
            for o in 0..t.o {
                let gi = o / og;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc: i64 = 0;
                        for c in 0..cg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * cv.stride + ky * cv.dilation) as isize
                                        - cv.padding as isize;
                                    let ix = (ox * cv.stride + kx * cv.dilation) as isize
                                        - cv.padding as isize;
                                    if iy < 0 || ix < 0 || iy >= t.h as isize || ix >= t.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((n * t.c + gi * cg + c) * t.h + iy as usize) * t.w
                                        + ix as usize]
                                        as i64;
                                    let wv = w.codes()[((o * cg + c) * kh + ky) * kw + kx] as i64;
                                    acc += (xv - t.xzp as i64) * wv;
                                }
                            }
                        }
                        let v = (acc as f32 * (xs * w.scale(o)) + bias[o]) * (1.0 / rq.scale());
                        let q = rq.zero_point() as i64 + v.round_ties_even() as i64;
                        y.push(q.clamp(rq.lowest_code() as i64, rq.quant_max() as i64) as u8);
                    }
                }
            }
        }
        (vec![t.n, t.o, oh, ow], y)
    }

    fn cfg(padding: usize, stride: usize, dilation: usize, groups: usize) -> ConvConfig {
        ConvConfig {
            padding,
            stride,
            dilation,
            groups,
        }
    }

    #[test]
    fn matches_direct_convolution() {
        let cases = [
            Case {
                n: 2,
                c: 3,
                h: 7,
                w: 9,
                o: 5,
                k: (3, 3),
                conv: cfg(1, 1, 1, 1),
                amax: 127,
                xzp: 60,
                relu: false,
            },
            Case {
                n: 1,
                c: 4,
                h: 5,
                w: 5,
                o: 4,
                k: (3, 3),
                conv: cfg(1, 1, 1, 2),
                amax: 127,
                xzp: 51,
                relu: false,
            },
            Case {
                n: 2,
                c: 4,
                h: 11,
                w: 10,
                o: 6,
                k: (3, 3),
                conv: cfg(1, 2, 1, 1),
                amax: 255,
                xzp: 128,
                relu: true,
            },
            Case {
                n: 1,
                c: 3,
                h: 12,
                w: 13,
                o: 7,
                k: (3, 3),
                conv: cfg(2, 1, 2, 1),
                amax: 255,
                xzp: 200,
                relu: false,
            },
            Case {
                n: 3,
                c: 8,
                h: 6,
                w: 6,
                o: 8,
                k: (1, 1),
                conv: cfg(0, 1, 1, 1),
                amax: 127,
                xzp: 0,
                relu: true,
            },
            Case {
                n: 2,
                c: 6,
                h: 9,
                w: 20,
                o: 6,
                k: (3, 3),
                conv: cfg(1, 1, 1, 6),
                amax: 255,
                xzp: 3,
                relu: false,
            },
            Case {
                n: 1,
                c: 2,
                h: 33,
                w: 35,
                o: 3,
                k: (5, 3),
                conv: cfg(2, 3, 1, 1),
                amax: 127,
                xzp: 17,
                relu: true,
            },
            // Width stride 2 over rows of several 16-position steps.
            Case {
                n: 2,
                c: 5,
                h: 17,
                w: 37,
                o: 6,
                k: (3, 3),
                conv: cfg(1, 2, 1, 1),
                amax: 127,
                xzp: 9,
                relu: true,
            },
            Case {
                n: 1,
                c: 3,
                h: 20,
                w: 45,
                o: 5,
                k: (5, 3),
                conv: cfg(2, 2, 2, 1),
                amax: 255,
                xzp: 130,
                relu: false,
            },
            Case {
                n: 4,
                c: 32,
                h: 14,
                w: 14,
                o: 64,
                k: (3, 3),
                conv: cfg(1, 1, 1, 1),
                amax: 127,
                xzp: 40,
                relu: false,
            },
            Case {
                n: 2,
                c: 16,
                h: 13,
                w: 12,
                o: 16,
                k: (3, 3),
                conv: cfg(1, 2, 1, 16),
                amax: 127,
                xzp: 37,
                relu: true,
            },
            Case {
                n: 1,
                c: 5,
                h: 17,
                w: 19,
                o: 5,
                k: (5, 5),
                conv: cfg(4, 1, 2, 5),
                amax: 255,
                xzp: 250,
                relu: false,
            },
            Case {
                n: 3,
                c: 7,
                h: 1,
                w: 40,
                o: 7,
                k: (1, 3),
                conv: cfg(0, 1, 1, 7),
                amax: 255,
                xzp: 0,
                relu: false,
            },
        ];
        let mut s: u32 = 5;
        let mut next = move |n: u32| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) % n
        };
        for t in &cases {
            let xq: Vec<u8> = (0..t.n * t.c * t.h * t.w)
                .map(|_| next(t.amax + 1) as u8)
                .collect();
            let cg = t.c / t.conv.groups;
            let wshape = [t.o, cg, t.k.0, t.k.1];
            let codes: Vec<i8> = (0..t.o * cg * t.k.0 * t.k.1)
                .map(|_| next(256) as u8 as i8)
                .collect();
            let scales: Vec<f32> = (0..t.o).map(|i| 0.002 + 0.0003 * i as f32).collect();
            let w = QuantizedWeight::from_codes(codes, &wshape, &scales).unwrap();
            let bias: Vec<f32> = (0..t.o).map(|i| (i as f32 - 2.0) * 0.1).collect();
            let rq = Requant::new(0.05, 30, 0, t.amax as i32)
                .unwrap()
                .with_relu(t.relu);
            let x = Tensor::from_vec(xq.clone(), (t.n, t.c, t.h, t.w), &Device::Cpu).unwrap();
            let xs = 0.03f32;
            let y = quantized_conv2d(&x, xs, t.xzp, &w, Some(&bias), &t.conv, &rq).unwrap();
            let (shape, want) = reference(t, &xq, &w, &bias, &rq, xs);
            assert_eq!(y.dims(), shape.as_slice());
            assert_eq!(y.flatten_all().unwrap().to_vec1::<u8>().unwrap(), want);
            // Every kernel the CPU has (VNNI requantizes in its tiles, the others after).
            let g = Geometry::new(x.dims(), w.shape(), &t.conv).unwrap();
            let plan = rq.plan(xs, &w, Some(&bias)).unwrap();
            for k in [Kernel::Portable, Kernel::Avx2, Kernel::Avx512Vnni] {
                if k.is_available() {
                    let y = run_with(&x, t.xzp, &w, &g, &plan, k).unwrap();
                    let got = y.flatten_all().unwrap().to_vec1::<u8>().unwrap();
                    assert_eq!(got, want, "{k:?}");
                }
            }
        }
    }

    /// A product large enough to be split over rayon tasks by weight rows (inside one image,
    /// and across images), on every kernel, against the direct convolution.
    #[test]
    fn parallel_split_matches_direct_convolution() {
        let t = Case {
            n: 2,
            c: 64,
            h: 20,
            w: 20,
            o: 72,
            k: (3, 3),
            conv: cfg(1, 1, 1, 1),
            amax: 127,
            xzp: 33,
            relu: true,
        };
        let mut s: u32 = 11;
        let mut next = move |n: u32| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) % n
        };
        let xq: Vec<u8> = (0..t.n * t.c * t.h * t.w)
            .map(|_| next(t.amax + 1) as u8)
            .collect();
        let codes: Vec<i8> = (0..t.o * t.c * 9).map(|_| next(256) as u8 as i8).collect();
        let scales: Vec<f32> = (0..t.o).map(|i| 0.001 + 0.0001 * i as f32).collect();
        let w = QuantizedWeight::from_codes(codes, &[t.o, t.c, 3, 3], &scales).unwrap();
        let bias: Vec<f32> = (0..t.o).map(|i| (i as f32 - 30.0) * 0.01).collect();
        let rq = Requant::new(0.2, 10, 0, 127).unwrap().with_relu(true);
        let x = Tensor::from_vec(xq.clone(), (t.n, t.c, t.h, t.w), &Device::Cpu).unwrap();
        let (_, want) = reference(&t, &xq, &w, &bias, &rq, 0.02);
        let g = Geometry::new(x.dims(), w.shape(), &t.conv).unwrap();
        assert!(
            t.o * g.positions() * g.row_len() >= 1 << 22,
            "large enough to split"
        );
        let plan = rq.plan(0.02, &w, Some(&bias)).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for k in [Kernel::Portable, Kernel::Avx2, Kernel::Avx512Vnni] {
            if k.is_available() {
                let y = pool
                    .install(|| run_with(&x, t.xzp, &w, &g, &plan, k))
                    .unwrap();
                let got = y.flatten_all().unwrap().to_vec1::<u8>().unwrap();
                assert_eq!(got, want, "{k:?}");
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let rq = Requant::new(0.1, 0, 0, 255).unwrap();
        let w = QuantizedWeight::from_codes(vec![1; 2 * 2 * 3 * 3], &[2, 2, 3, 3], &[0.1]).unwrap();
        let x = Tensor::from_vec(vec![0u8; 2 * 5 * 5], (1, 2, 5, 5), &Device::Cpu).unwrap();
        let c = ConvConfig::default();
        assert!(quantized_conv2d(&x, 0.1, 0, &w, None, &c, &rq).is_ok());
        let empty = Tensor::zeros((0, 2, 5, 5), candle_core::DType::U8, &Device::Cpu).unwrap();
        let y = quantized_conv2d(&empty, 0.1, 0, &w, None, &c, &rq).unwrap();
        assert_eq!(y.dims(), &[0, 2, 3, 3]);
        let x3 = Tensor::from_vec(vec![0u8; 2 * 5 * 5], (2, 5, 5), &Device::Cpu).unwrap();
        assert!(quantized_conv2d(&x3, 0.1, 0, &w, None, &c, &rq).is_err());
        let x1 = Tensor::from_vec(vec![0u8; 5 * 5], (1, 1, 5, 5), &Device::Cpu).unwrap();
        assert!(quantized_conv2d(&x1, 0.1, 0, &w, None, &c, &rq).is_err());
        let small = Tensor::from_vec(vec![0u8; 2 * 4], (1, 2, 2, 2), &Device::Cpu).unwrap();
        assert!(quantized_conv2d(&small, 0.1, 0, &w, None, &c, &rq).is_err());
        assert!(quantized_conv2d(&x, 0.1, 0, &w, None, &cfg(0, 0, 1, 1), &rq).is_err());
        assert!(quantized_conv2d(&x, 0.1, 0, &w, None, &cfg(0, 1, 1, 2), &rq).is_err());
        assert!(quantized_conv2d(&x, 0.1, 0, &w, Some(&[0.0]), &c, &rq).is_err());
        let xf = x.to_dtype(candle_core::DType::F32).unwrap();
        assert!(quantized_conv2d(&xf, 0.1, 0, &w, None, &c, &rq).is_err());
    }
}
