//! Int8 transposed convolution (PyTorch's `torch.ao.nn.quantized.ConvTranspose1d/2d`) as a
//! direct one: the input codes dilated by the stride (the zero point between neighbours, so
//! that each inserted tap adds `x - x_zp = 0`), padded with the zero point by `dilation *
//! (k - 1) - padding` before and that plus `output_padding` after (cropped where negative),
//! then the int8 convolution of [`super::conv`] with stride 1, the layer's dilation and
//! groups and the flipped, transposed kernel. Every tap of the transposed convolution is one
//! product of that convolution, and the i32 sums are exact, so the result is the transposed
//! convolution's exactly; one requantization follows, as for every int8 layer.
//!
//! Weights come in PyTorch's layout `(in, out / groups, k...)` with one scale or one per index
//! of axis 1 (per-channel quantization of a transposed-conv weight is along its axis 1, as
//! ONNX's `DequantizeLinear` on a `ConvTranspose` weight and PT2E's quantizers have it; with
//! groups > 1 output channel `g * (out / groups) + j` uses scale `j`). They are held in the
//! direct convolution's layout `(out, in / groups, k...)`, flipped, with that scale repeated
//! for each output channel, which [`super::QuantizedWeight`] packs for the GEMM kernels.

use candle_core::{DType, Tensor};

use super::conv::conv2d_int;
use super::conv1d::conv1d_int;
use super::qtensor::on_u8;
use super::requant::Requant;
use super::weight::QuantizedWeight;
use crate::error::{Error, Result};
use crate::geometry::{ConvConfig, ConvTransposeConfig};

/// Checks a transposed-conv weight shape `(in, out / groups, k...)` against `groups` and
/// returns `(in / groups, out / groups, kernel taps)`.
fn split(shape: &[usize], groups: usize) -> Result<(usize, usize, usize)> {
    if shape.len() < 3 || groups == 0 || !shape[0].is_multiple_of(groups) {
        return Err(Error::tensor(
            format!("a transposed-conv weight of shape {shape:?} with {groups} groups"),
            "give the weight as (in_channels, out_channels / groups, k...) with in_channels \
             divisible by groups",
        ));
    }
    Ok((shape[0] / groups, shape[1], shape[2..].iter().product()))
}

/// `data` in the transposed layout `(in, out / groups, k...)` rearranged into the direct
/// convolution's `(out, in / groups, k...)` with every spatial axis reversed: element
/// `[g * cpg + i, j, t]` goes to `[g * opg + j, i, taps - 1 - t]` (reversing the flat tap
/// index reverses every spatial axis at once). Returns the data and its shape.
pub(crate) fn to_direct<T: Copy>(
    data: &[T],
    shape: &[usize],
    groups: usize,
) -> Result<(Vec<T>, Vec<usize>)> {
    let (cpg, opg, taps) = split(shape, groups)?;
    if data.len() != shape.iter().product::<usize>() {
        return Err(Error::tensor(
            format!("{} weight values for the shape {shape:?}", data.len()),
            "give one value per element, row-major",
        ));
    }
    let mut out = Vec::with_capacity(data.len());
    for g in 0..groups {
        for j in 0..opg {
            for i in 0..cpg {
                let row = ((g * cpg + i) * opg + j) * taps;
                out.extend((0..taps).rev().map(|t| data[row + t]));
            }
        }
    }
    let mut direct = vec![groups * opg, cpg];
    direct.extend_from_slice(&shape[2..]);
    Ok((out, direct))
}

/// The inverse of [`to_direct`]: direct `(out, in / groups, k...)` data back to the
/// transposed layout `(in, out / groups, k...)`.
pub(crate) fn to_transposed<T: Copy>(
    data: &[T],
    direct: &[usize],
    groups: usize,
) -> Result<(Vec<T>, Vec<usize>)> {
    if direct.len() < 3 || groups == 0 || !direct[0].is_multiple_of(groups) {
        return Err(Error::tensor(
            format!("a direct conv weight of shape {direct:?} with {groups} groups"),
            "report this as a bug",
        ));
    }
    let (opg, cpg, taps) = (
        direct[0] / groups,
        direct[1],
        direct[2..].iter().product::<usize>(),
    );
    let mut out = Vec::with_capacity(data.len());
    for g in 0..groups {
        for i in 0..cpg {
            for j in 0..opg {
                let row = ((g * opg + j) * cpg + i) * taps;
                out.extend((0..taps).rev().map(|t| data[row + t]));
            }
        }
    }
    let mut shape = vec![groups * cpg, opg];
    shape.extend_from_slice(&direct[2..]);
    Ok((out, shape))
}

/// Scales of a transposed-conv weight (one, or one per index `j` of axis 1) as the direct
/// weight's (one, or one per output channel `g * opg + j`).
fn direct_scales(scales: &[f32], opg: usize, groups: usize) -> Result<Vec<f32>> {
    match scales.len() {
        1 => Ok(scales.to_vec()),
        n if n == opg => Ok((0..groups).flat_map(|_| scales.iter().copied()).collect()),
        n => Err(Error::qparams(
            format!("{n} weight scales for a transposed-conv weight with {opg} columns"),
            "give one scale, or one per index of axis 1 (out_channels / groups)",
        )),
    }
}

/// Quantizes a float transposed-conv weight `(in, out / groups, k...)` with `scales` (one, or
/// one per index of axis 1): the codes are [`QuantizedWeight::quantize`]'s, held in the direct
/// layout.
pub(crate) fn quantize_transposed(
    w: &Tensor,
    scales: &[f32],
    quant_min: i32,
    quant_max: i32,
    groups: usize,
) -> Result<QuantizedWeight> {
    let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (_, opg, _) = split(w.dims(), groups)?;
    let (direct, shape) = to_direct(&data, w.dims(), groups)?;
    let t = Tensor::from_vec(direct, shape, &candle_core::Device::Cpu)?;
    QuantizedWeight::quantize(
        &t,
        &direct_scales(scales, opg, groups)?,
        quant_min,
        quant_max,
    )
}

/// A transposed-conv weight from codes in the transposed layout and its scales (one, or one
/// per index of axis 1), held in the direct layout.
pub(crate) fn transposed_from_codes(
    codes: Vec<i8>,
    shape: &[usize],
    scales: &[f32],
    groups: usize,
) -> Result<QuantizedWeight> {
    let (_, opg, _) = split(shape, groups)?;
    let (direct, dshape) = to_direct(&codes, shape, groups)?;
    QuantizedWeight::from_codes(direct, &dshape, &direct_scales(scales, opg, groups)?)
}

/// A weight built by [`quantize_transposed`] or [`transposed_from_codes`] back in the
/// transposed layout: codes, shape `(in, out / groups, k...)` and scales (one, or one per
/// index of axis 1).
pub(crate) fn transposed_codes(
    w: &QuantizedWeight,
    groups: usize,
) -> Result<(Vec<i8>, Vec<usize>, Vec<f32>)> {
    let (codes, shape) = to_transposed(w.codes(), w.shape(), groups)?;
    let scales = w.scales();
    let opg = shape[1];
    let scales = if scales.len() == 1 {
        scales.to_vec()
    } else {
        let s = scales[..opg.min(scales.len())].to_vec();
        if scales.len() != opg * groups || scales.chunks(opg).any(|c| c != s.as_slice()) {
            return Err(Error::state(
                "a transposed-conv weight whose scales differ between groups",
                "report this as a bug",
            ));
        }
        s
    };
    Ok((codes, shape, scales))
}

/// One spatial axis of the dilation: input length, stride, and padding before and after
/// (negative: cropped).
#[derive(Clone, Copy)]
struct Axis {
    len: usize,
    stride: usize,
    before: isize,
    after: isize,
}

impl Axis {
    /// The dilated, padded length (`None` when cropping leaves nothing).
    fn out_len(&self) -> Option<usize> {
        let dilated = (self.len.checked_sub(1)? * self.stride + 1) as isize;
        usize::try_from(dilated + self.before + self.after)
            .ok()
            .filter(|&n| n > 0)
    }

    /// The input index at dilated, padded position `p`, if it holds one.
    fn source(&self, p: usize) -> Option<usize> {
        let u = p as isize - self.before;
        if u < 0 || u % self.stride as isize != 0 {
            return None;
        }
        let i = (u / self.stride as isize) as usize;
        (i < self.len).then_some(i)
    }
}

/// Dilates and pads `(planes, h, w)` codes with `zp`.
fn dilate(xs: &[u8], planes: usize, h: Axis, w: Axis, zp: u8) -> Result<(Vec<u8>, usize, usize)> {
    let (Some(hp), Some(wp)) = (h.out_len(), w.out_len()) else {
        return Err(Error::tensor(
            "a transposed convolution whose padding removes the whole output",
            "use a smaller padding or a larger input",
        ));
    };
    let rows: Vec<Option<usize>> = (0..hp).map(|p| h.source(p)).collect();
    let cols: Vec<Option<usize>> = (0..wp).map(|p| w.source(p)).collect();
    let mut out = vec![zp; planes * hp * wp];
    for (plane, o) in out.chunks_mut(hp * wp).enumerate() {
        let src = &xs[plane * h.len * w.len..(plane + 1) * h.len * w.len];
        for (r, or) in rows.iter().zip(o.chunks_mut(wp)) {
            let Some(r) = r else { continue };
            let srow = &src[r * w.len..(r + 1) * w.len];
            for (c, v) in cols.iter().zip(or.iter_mut()) {
                if let Some(c) = c {
                    *v = srow[*c];
                }
            }
        }
    }
    Ok((out, hp, wp))
}

/// An int8 transposed convolution over `rank` (1 or 2) spatial dims with an int32 bias added
/// to the sums (qnnpack's arithmetic; zeros for fbgemm/x86): `x` holds u8 codes `(N, C, L)` or
/// `(N, C, H, W)`, `w` the weight from [`quantize_transposed`] / [`transposed_from_codes`];
/// requantized codes with `out`, or the f32 values it rounds without.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_transpose_int(
    x: &Tensor,
    x_scale: f32,
    x_zero_point: i32,
    w: &QuantizedWeight,
    bias: &[f32],
    int_bias: &[i32],
    c: &ConvTransposeConfig,
    rank: usize,
    out: Option<&Requant>,
) -> Result<Tensor> {
    let what = if rank == 1 {
        "ConvTranspose1d"
    } else {
        "ConvTranspose2d"
    };
    let wshape = w.shape();
    if !(rank == 1 || rank == 2) || x.rank() != rank + 2 || wshape.len() != rank + 2 {
        return Err(Error::tensor(
            format!(
                "int8 {what} of an input of shape {:?} with a weight of shape {wshape:?}",
                x.dims()
            ),
            format!(
                "feed {what} a (N, C, {}) tensor",
                ["L", "H, W"][rank.clamp(1, 2) - 1]
            ),
        ));
    }
    if c.stride == 0 || c.dilation == 0 {
        return Err(Error::config(
            format!(
                "int8 {what} with stride {} and dilation {}",
                c.stride, c.dilation
            ),
            "use stride and dilation >= 1",
        ));
    }
    if !(0..=255).contains(&x_zero_point) {
        return Err(Error::qparams(
            format!("input zero point {x_zero_point} is not a u8 code"),
            "use a zero point in 0..=255",
        ));
    }
    let dims = x.dims();
    let (n, ch) = (dims[0], dims[1]);
    let (h, wd) = if rank == 1 {
        (1, dims[2])
    } else {
        (dims[2], dims[3])
    };
    let axis = |len: usize, k: usize| {
        let (before, after) = c.dilated_padding(k);
        Axis {
            len,
            stride: c.stride,
            before,
            after,
        }
    };
    let kw = wshape[rank + 1];
    let h_axis = if rank == 1 {
        Axis {
            len: 1,
            stride: 1,
            before: 0,
            after: 0,
        }
    } else {
        axis(h, wshape[2])
    };
    let w_axis = axis(wd, kw);
    let zp = x_zero_point as u8;
    let (xd, hp, wp) = on_u8(x, what, |xs| dilate(xs, n * ch, h_axis, w_axis, zp))??;
    let direct = ConvConfig {
        padding: 0,
        stride: 1,
        dilation: c.dilation,
        groups: c.groups,
    };
    if rank == 1 {
        let xd = Tensor::from_vec(xd, (n, ch, wp), x.device())?;
        conv1d_int(&xd, x_scale, x_zero_point, w, bias, int_bias, &direct, out)
    } else {
        let xd = Tensor::from_vec(xd, (n, ch, hp, wp), x.device())?;
        conv2d_int(&xd, x_scale, x_zero_point, w, bias, int_bias, &direct, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rng(seed: u32) -> impl FnMut(u32) -> u32 {
        let mut s = seed;
        move |n| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) % n
        }
    }

    /// The layouts round-trip, and a 1x1 kernel's direct form is the transposed matrix.
    #[test]
    fn layouts_round_trip() {
        let mut next = rng(3);
        for (shape, groups) in [
            (vec![4usize, 3, 2, 3], 1usize),
            (vec![6, 2, 3, 1], 3),
            (vec![4, 5, 3], 2),
        ] {
            let n: usize = shape.iter().product();
            let data: Vec<i32> = (0..n).map(|_| next(1000) as i32).collect();
            let (d, ds) = to_direct(&data, &shape, groups).unwrap();
            assert_eq!(ds[0], shape[1] * groups);
            assert_eq!(ds[1], shape[0] / groups);
            let (back, bs) = to_transposed(&d, &ds, groups).unwrap();
            assert_eq!((back, bs), (data, shape));
        }
        let (d, ds) = to_direct(&[1, 2, 3, 4, 5, 6], &[2, 3, 1, 1], 1).unwrap();
        assert_eq!(ds, vec![3, 2, 1, 1]);
        assert_eq!(d, vec![1, 4, 2, 5, 3, 6]);
        assert!(to_direct(&[0; 12], &[3, 2, 2], 2).is_err());
    }

    /// The int8 transposed convolution against a scatter loop over the definition
    /// `y[oc, i * s - p + t * d] += (x[ic, i] - zp) * w[ic, j, t]`, on the i32 sums
    /// (`out = None`, one scale 1, no bias: the f32 values are the sums).
    #[test]
    fn matches_a_scatter_loop() {
        let mut next = rng(17);
        // (n, cin, cout, h, w, k, stride, padding, output_padding, dilation, groups, zp)
        let cases = [
            (2, 3, 4, 4, 5, 3, 2, 1, 1, 1, 1, 7),
            (1, 4, 6, 3, 3, 2, 1, 0, 0, 1, 2, 128),
            (2, 4, 4, 5, 4, 3, 3, 2, 2, 2, 4, 0),
            (1, 2, 3, 3, 4, 4, 2, 3, 0, 1, 1, 255),
            (1, 6, 3, 2, 3, 3, 2, 0, 1, 2, 3, 30),
        ];
        for (n, cin, cout, h, wd, k, stride, pad, opad, dil, groups, zp) in cases {
            let c = ConvTransposeConfig {
                padding: pad,
                output_padding: opad,
                stride,
                dilation: dil,
                groups,
            };
            let (cpg, opg) = (cin / groups, cout / groups);
            let xs: Vec<u8> = (0..n * cin * h * wd).map(|_| next(256) as u8).collect();
            let ws: Vec<i8> = (0..cin * opg * k * k)
                .map(|_| next(256) as u8 as i8)
                .collect();
            let w = transposed_from_codes(ws.clone(), &[cin, opg, k, k], &[1.0], groups).unwrap();
            let x = Tensor::from_vec(xs.clone(), (n, cin, h, wd), &Device::Cpu).unwrap();
            let zeros = vec![0f32; cout];
            let izeros = vec![0i32; cout];
            let y = conv_transpose_int(&x, 1.0, zp, &w, &zeros, &izeros, &c, 2, None).unwrap();
            let (oh, ow) = (c.out_len(h, k).unwrap(), c.out_len(wd, k).unwrap());
            assert_eq!(y.dims(), &[n, cout, oh, ow]);
            let mut want = vec![0i64; n * cout * oh * ow];
            for b in 0..n {
                for ic in 0..cin {
                    let g = ic / cpg;
                    for j in 0..opg {
                        let oc = g * opg + j;
                        for iy in 0..h {
                            for ix in 0..wd {
                                let xv = xs[((b * cin + ic) * h + iy) * wd + ix] as i64 - zp as i64;
                                for ty in 0..k {
                                    for tx in 0..k {
                                        let oy = (iy * stride + ty * dil) as isize - pad as isize;
                                        let ox = (ix * stride + tx * dil) as isize - pad as isize;
                                        if oy < 0
                                            || ox < 0
                                            || oy >= oh as isize
                                            || ox >= ow as isize
                                        {
                                            continue;
                                        }
                                        let wv = ws[((ic * opg + j) * k + ty) * k + tx] as i64;
                                        want[((b * cout + oc) * oh + oy as usize) * ow
                                            + ox as usize] += xv * wv;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            assert_eq!(
                got,
                want,
                "{:?}",
                (n, cin, cout, k, stride, pad, opad, dil, groups)
            );

            // 1-D: the row iy = 0 of the input, with a k-tap kernel.
            let x1 = x
                .narrow(2, 0, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .contiguous()
                .unwrap();
            let ws1: Vec<i8> = (0..cin * opg * k).map(|_| next(256) as u8 as i8).collect();
            let w1 = transposed_from_codes(ws1.clone(), &[cin, opg, k], &[1.0], groups).unwrap();
            let y1 = conv_transpose_int(&x1, 1.0, zp, &w1, &zeros, &izeros, &c, 1, None).unwrap();
            assert_eq!(y1.dims(), &[n, cout, ow]);
            let mut want1 = vec![0i64; n * cout * ow];
            for b in 0..n {
                for ic in 0..cin {
                    let g = ic / cpg;
                    for j in 0..opg {
                        for ix in 0..wd {
                            let xv = xs[((b * cin + ic) * h) * wd + ix] as i64 - zp as i64;
                            for tx in 0..k {
                                let ox = (ix * stride + tx * dil) as isize - pad as isize;
                                if ox < 0 || ox >= ow as isize {
                                    continue;
                                }
                                let wv = ws1[(ic * opg + j) * k + tx] as i64;
                                want1[(b * cout + g * opg + j) * ow + ox as usize] += xv * wv;
                            }
                        }
                    }
                }
            }
            let got1: Vec<f32> = y1.flatten_all().unwrap().to_vec1().unwrap();
            let want1: Vec<f32> = want1.iter().map(|&v| v as f32).collect();
            assert_eq!(
                got1,
                want1,
                "1-D {:?}",
                (n, cin, cout, k, stride, pad, opad, dil)
            );
        }
    }

    /// Per-axis-1 scales apply to output channel `g * opg + j` as scale `j`, and survive the
    /// round trip to the transposed layout.
    #[test]
    fn per_channel_scales_follow_axis_one() {
        let w = Tensor::new(
            &[
                [[0.5f32], [1.0]],
                [[-0.25], [2.0]],
                [[1.0], [1.0]],
                [[0.5], [-1.0]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let q = quantize_transposed(&w, &[0.5 / 127.0, 2.0 / 127.0], -128, 127, 2).unwrap();
        assert_eq!(
            q.scales(),
            &[0.5 / 127.0, 2.0 / 127.0, 0.5 / 127.0, 2.0 / 127.0]
        );
        let (codes, shape, scales) = transposed_codes(&q, 2).unwrap();
        assert_eq!(shape, vec![4, 2, 1]);
        assert_eq!(scales, vec![0.5 / 127.0, 2.0 / 127.0]);
        assert_eq!(codes, vec![127, 64, -64, 127, 127, 64, 127, -64]);
        assert!(quantize_transposed(&w, &[1.0, 1.0, 1.0], -128, 127, 2).is_err());
    }
}
