//! Int8 1-D convolution: the 2-D kernel of [`super::conv`] run with height 1 (input
//! `(N, C, L)` as `(N, C, 1, L)`, weight `(O, C / groups, k)` as `(O, C / groups, 1, k)`,
//! padding and stride along the length only).

use candle_core::Tensor;

use super::conv::conv1d_with;
use super::requant::{Affine, Requant};
use super::weight::QuantizedWeight;
use crate::error::Result;
use crate::geometry::ConvConfig;

/// Int8 1-D convolution (PyTorch's `torch.ao.nn.quantized.Conv1d`, and `ConvReLU1d` with
/// [`Requant::with_relu`]): `x` holds u8 codes `(N, C, L)` quantized with `x_scale` /
/// `x_zero_point`, `w` int8 weights `(O, C / groups, k)`; the result holds the output's u8
/// codes `(N, O, OL)`. The arithmetic is [`quantized_conv2d`](super::quantized_conv2d)'s
/// (padding with the zero point, exact i32 sums, one requantization), with `conv`'s padding,
/// stride and dilation along the length.
///
/// Errors as [`quantized_conv2d`](super::quantized_conv2d), for 3-D inputs and weights.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::nn::ConvConfig;
/// use qat_core::quantized::{quantized_conv1d, QuantizedWeight, Requant};
/// // A width-3 box filter (codes 1, scale 0.5) over 4 positions with zero point 5.
/// let w = QuantizedWeight::from_codes(vec![1; 3], &[1, 1, 3], &[0.5])?;
/// let x = Tensor::new(&[[[7u8, 5, 9, 5]]], &Device::Cpu)?; // (2, 0, 4, 0) above zp
/// let conv = ConvConfig { padding: 1, ..Default::default() };
/// let y = quantized_conv1d(&x, 1.0, 5, &w, None, &conv, &Requant::new(1.0, 0, 0, 255)?)?;
/// // Window sums 2, 6, 4, 4 times 0.5.
/// assert_eq!(y.dims(), &[1, 1, 4]);
/// assert_eq!(y.flatten_all()?.to_vec1::<u8>()?, vec![1, 3, 2, 2]);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn quantized_conv1d(
    x: &Tensor,
    x_scale: f32,
    x_zero_point: i32,
    w: &QuantizedWeight,
    bias: Option<&[f32]>,
    conv: &ConvConfig,
    out: &Requant,
) -> Result<Tensor> {
    let plan = out.plan(x_scale, w, bias)?;
    conv1d_with(x, x_zero_point, w, conv, &plan)
}

/// An int8 1-D convolution with an int32 bias added to the sums (qnnpack's arithmetic; zeros
/// for fbgemm/x86): requantized codes with `out`, or the f32 values it rounds without.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv1d_int(
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
        Some(r) => conv1d_with(x, x_zero_point, w, conv, &r.plan_with(affine)),
        None => conv1d_with(x, x_zero_point, w, conv, &affine),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantized::quantized_conv2d;
    use candle_core::Device;

    /// Conv1d equals the 2-D kernel on the same data with height 1 (padding 0 there is what
    /// padding only the length means), and a direct loop.
    #[test]
    fn matches_conv2d_with_height_one_and_a_direct_loop() {
        let mut s: u32 = 11;
        let mut next = move |n: u32| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) % n
        };
        // (n, c, l, o, k, padding, stride, dilation, groups, x zero point, relu)
        let cases = [
            (2, 3, 17, 5, 3, 1, 1, 1, 1, 60, false),
            (1, 4, 9, 4, 3, 0, 2, 1, 2, 0, true),
            (3, 6, 40, 6, 5, 2, 1, 2, 3, 128, false),
            (2, 8, 33, 16, 1, 0, 1, 1, 1, 17, true),
            (1, 2, 5, 2, 5, 2, 3, 1, 2, 200, false),
        ];
        for (n, c, l, o, k, pad, stride, dil, groups, xzp, relu) in cases {
            let conv = ConvConfig {
                padding: pad,
                stride,
                dilation: dil,
                groups,
            };
            let cg = c / groups;
            let xq: Vec<u8> = (0..n * c * l).map(|_| next(256) as u8).collect();
            let codes: Vec<i8> = (0..o * cg * k).map(|_| next(256) as u8 as i8).collect();
            let scales: Vec<f32> = (0..o).map(|i| 0.002 + 0.0003 * i as f32).collect();
            let bias: Vec<f32> = (0..o).map(|i| (i as f32 - 2.0) * 0.1).collect();
            let rq = Requant::new(0.05, 30, 0, 255).unwrap().with_relu(relu);
            let xs = 0.03f32;
            let w1 = QuantizedWeight::from_codes(codes.clone(), &[o, cg, k], &scales).unwrap();
            let x1 = Tensor::from_vec(xq.clone(), (n, c, l), &Device::Cpu).unwrap();
            let y1 = quantized_conv1d(&x1, xs, xzp, &w1, Some(&bias), &conv, &rq).unwrap();
            let ol = (l + 2 * pad - dil * (k - 1) - 1) / stride + 1;
            assert_eq!(y1.dims(), &[n, o, ol]);
            let y1 = y1.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            // Direct loop.
            let og = o / groups;
            let mut want = Vec::new();
            for b in 0..n {
                for oc in 0..o {
                    let g = oc / og;
                    for ox in 0..ol {
                        let mut acc = 0i64;
                        for ci in 0..cg {
                            for kx in 0..k {
                                let ix = (ox * stride + kx * dil) as isize - pad as isize;
                                if ix < 0 || ix >= l as isize {
                                    continue;
                                }
                                let xv = xq[(b * c + g * cg + ci) * l + ix as usize] as i64;
                                acc += (xv - xzp as i64) * codes[(oc * cg + ci) * k + kx] as i64;
                            }
                        }
                        let v = (acc as f32 * (xs * w1.scale(oc)) + bias[oc]) * (1.0 / rq.scale());
                        let q = rq.zero_point() as i64 + v.round_ties_even() as i64;
                        want.push(q.clamp(rq.lowest_code() as i64, rq.quant_max() as i64) as u8);
                    }
                }
            }
            assert_eq!(
                y1, want,
                "{n} {c} {l} {o} {k} {pad} {stride} {dil} {groups}"
            );
            // Without padding, the 2-D kernel over (N, C, 1, L) computes the same codes.
            if pad == 0 {
                let w2 = QuantizedWeight::from_codes(codes, &[o, cg, 1, k], &scales).unwrap();
                let x2 = x1.reshape((n, c, 1, l)).unwrap();
                let y2 = quantized_conv2d(&x2, xs, xzp, &w2, Some(&bias), &conv, &rq).unwrap();
                assert_eq!(y2.flatten_all().unwrap().to_vec1::<u8>().unwrap(), y1);
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let rq = Requant::new(0.1, 0, 0, 255).unwrap();
        let w = QuantizedWeight::from_codes(vec![1; 2 * 2 * 3], &[2, 2, 3], &[0.1]).unwrap();
        let x = Tensor::from_vec(vec![0u8; 2 * 5], (1, 2, 5), &Device::Cpu).unwrap();
        let c = ConvConfig::default();
        assert!(quantized_conv1d(&x, 0.1, 0, &w, None, &c, &rq).is_ok());
        let x4 = x.reshape((1, 2, 1, 5)).unwrap();
        let e = quantized_conv1d(&x4, 0.1, 0, &w, None, &c, &rq).unwrap_err();
        assert!(e.to_string().contains("(N, C, L)"), "{e}");
        let w4 = QuantizedWeight::from_codes(vec![1; 2 * 2 * 3], &[2, 2, 1, 3], &[0.1]).unwrap();
        assert!(quantized_conv1d(&x, 0.1, 0, &w4, None, &c, &rq).is_err());
        let short = Tensor::from_vec(vec![0u8; 2 * 2], (1, 2, 2), &Device::Cpu).unwrap();
        assert!(quantized_conv1d(&short, 0.1, 0, &w, None, &c, &rq).is_err());
        let xf = x.to_dtype(candle_core::DType::F32).unwrap();
        assert!(quantized_conv1d(&xf, 0.1, 0, &w, None, &c, &rq).is_err());
    }
}
