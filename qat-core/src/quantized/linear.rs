//! Int8 linear layer: u8 activations x int8 weights -> u8 activations.

use candle_core::{Tensor, WithDType};
use rayon::prelude::*;

use super::gemm::{gemm, gemv, Kernel, Panel, GEMV_MAX};
use super::qtensor::{max_code, on_u8};
use super::requant::{Affine, Epilogue, Requant};
use super::weight::QuantizedWeight;
use crate::error::{Error, Result};

/// Output elements below which requantization runs on the calling thread.
const PAR_OUT: usize = 1 << 16;

/// Int8 linear layer (PyTorch's `torch.ao.nn.quantized.Linear`, and `LinearReLU` with
/// [`Requant::with_relu`]): `x` holds u8 codes of shape `(.., in)` (2-D, 3-D or any rank),
/// quantized with `x_scale` / `x_zero_point`; the result holds the output's u8 codes, shape
/// `(.., out)`, on `x`'s device (the work runs on the CPU).
///
/// `acc[m][o] = sum_k (x_q[m][k] - x_zero_point) * w_q[o][k]` is exact in i32, then each
/// output channel is requantized as [`Requant`] says, with `bias` (one per output channel)
/// in float.
///
/// Errors when `x` is not a `U8` tensor whose last dim is the weight's row length (a 2-D
/// weight `(out, in)` is expected), when the bias does not have one value per output
/// channel, or on an invalid input scale or zero point.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::quantized::{quantized_linear, QuantizedWeight, Requant};
/// let w = QuantizedWeight::from_codes(vec![2, -1, 0, 3], &[2, 2], &[0.5, 0.25])?;
/// let x = Tensor::new(&[[12u8, 8], [10, 10]], &Device::Cpu)?; // zero point 10
/// let out = Requant::new(0.25, 100, 0, 255)?;
/// let y = quantized_linear(&x, 0.5, 10, &w, Some(&[1.0, 0.0]), &out)?;
/// // Row 0: acc = (2*2 + (-2)*(-1), 2*0 + (-2)*3) = (6, -6);
/// // (6 * 0.25 + 1.0) / 0.25 = 10 and -6 * 0.125 / 0.25 = -3.
/// assert_eq!(y.to_vec2::<u8>()?, vec![vec![110, 97], vec![104, 100]]);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn quantized_linear(
    x: &Tensor,
    x_scale: f32,
    x_zero_point: i32,
    w: &QuantizedWeight,
    bias: Option<&[f32]>,
    out: &Requant,
) -> Result<Tensor> {
    let plan = out.plan(x_scale, w, bias)?;
    linear_with(x, x_zero_point, w, &plan)
}

/// The float values an int8 linear layer requantizes, before rounding: per output channel
/// `c`, `acc * (x_scale * w_scale[c]) + bias[c]` in f32, with the exact i32 `acc` of
/// [`quantized_linear`] (same inputs, same errors). Fake-quantizing it with the output's
/// qparams and range (`x * (1 / y_scale)`, rounded half to even) gives
/// [`quantized_linear`]'s codes exactly.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::quantized::{linear_prerequant, QuantizedWeight};
/// let w = QuantizedWeight::from_codes(vec![2, -1, 0, 3], &[2, 2], &[0.5, 0.25])?;
/// let x = Tensor::new(&[[12u8, 8]], &Device::Cpu)?;
/// let y = linear_prerequant(&x, 0.5, 10, &w, &[1.0, 0.0])?;
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![2.5, -0.75]]);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn linear_prerequant(
    x: &Tensor,
    x_scale: f32,
    x_zero_point: i32,
    w: &QuantizedWeight,
    bias: &[f32],
) -> Result<Tensor> {
    let affine = Affine::new(x_scale, w, Some(bias))?;
    linear_with(x, x_zero_point, w, &affine)
}

/// An int8 linear layer with an int32 bias added to the sums (qnnpack's arithmetic; zeros
/// for fbgemm/x86): requantized codes with `out`, or the f32 values it rounds without.
pub(crate) fn linear_int(
    x: &Tensor,
    x_scale: f32,
    x_zero_point: i32,
    w: &QuantizedWeight,
    bias: &[f32],
    int_bias: &[i32],
    out: Option<&Requant>,
) -> Result<Tensor> {
    let affine = Affine::new(x_scale, w, Some(bias))?.with_int_bias(int_bias)?;
    match out {
        Some(r) => linear_with(x, x_zero_point, w, &r.plan_with(affine)),
        None => linear_with(x, x_zero_point, w, &affine),
    }
}

/// The int8 linear layer up to its i32 sums, then `epi` on each output channel.
fn linear_with<E: Epilogue>(
    x: &Tensor,
    x_zero_point: i32,
    w: &QuantizedWeight,
    epi: &E,
) -> Result<Tensor> {
    if w.shape().len() != 2 {
        return Err(Error::tensor(
            format!("a linear weight of shape {:?}", w.shape()),
            "give a 2-D weight (out_features, in_features)",
        ));
    }
    let k = w.row_len();
    let dims = x.dims();
    if dims.last() != Some(&k) {
        return Err(Error::tensor(
            format!("an int8 linear layer with {k} inputs got an input of shape {dims:?}"),
            format!("feed a (.., {k}) tensor of u8 codes"),
        ));
    }
    check_zero_point(x_zero_point)?;
    let o = w.out_channels();
    let y = on_u8(x, "the int8 linear input", |xs| {
        let m = xs.len() / k;
        let path = Kernel::Auto.path(max_code(xs))?;
        let mut acc = vec![0i32; o * m];
        if m <= GEMV_MAX {
            gemv(path, w.packed(), xs, x_zero_point, &mut acc)?;
        } else {
            let panel = Panel::from_rows(xs, m, k);
            gemm(path, w.packed(), 0..o, &panel, x_zero_point, &mut acc)?;
        }
        let zero = <E::Out as WithDType>::from_f64(0.0);
        if m == 0 {
            return Ok(Vec::new());
        }
        // acc is (out, m): finish it row by row (vectorised), then transpose to (m, out).
        let mut t = vec![zero; o * m];
        let finish = |(oi, (t, acc)): (usize, (&mut [E::Out], &[i32]))| epi.row(oi, acc, t);
        if m * o >= PAR_OUT {
            t.par_chunks_mut(m)
                .zip(acc.par_chunks(m))
                .enumerate()
                .for_each(finish);
        } else {
            t.chunks_mut(m)
                .zip(acc.chunks(m))
                .enumerate()
                .for_each(finish);
        }
        Ok::<_, Error>(transpose(&t, o, m))
    })??;
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = o;
    }
    Ok(Tensor::from_vec(y, shape, x.device())?)
}

/// `(rows, cols)` row-major to `(cols, rows)`, in 16 x 16 blocks.
fn transpose<T: Copy>(t: &[T], rows: usize, cols: usize) -> Vec<T> {
    const B: usize = 16;
    let mut out = t.to_vec();
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = t[r * cols + c];
                }
            }
        }
    }
    out
}

pub(crate) fn check_zero_point(x_zero_point: i32) -> Result<()> {
    if !(0..=255).contains(&x_zero_point) {
        return Err(Error::qparams(
            format!("input zero point {x_zero_point} is outside 0..=255"),
            "use the zero point the input codes were quantized with",
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The int8 linear as the formula says, in i64 / f32.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[u8],
        xs: f32,
        xzp: i32,
        w: &QuantizedWeight,
        bias: &[f32],
        ys: f32,
        yzp: i32,
        lo: i32,
        hi: i32,
    ) -> Vec<u8> {
        let (o, k) = (w.out_channels(), w.row_len());
        let m = x.len() / k;
        let mut y = Vec::new();
        for mi in 0..m {
            for oi in 0..o {
                let acc: i64 = (0..k)
                    .map(|j| (x[mi * k + j] as i64 - xzp as i64) * w.codes()[oi * k + j] as i64)
                    .sum();
                let t = (acc as f32 * (xs * w.scale(oi)) + bias[oi]) * (1.0 / ys);
                y.push((yzp as i64 + t.round_ties_even() as i64).clamp(lo as i64, hi as i64) as u8);
            }
        }
        y
    }

    #[test]
    fn matches_reference_2d_and_3d() {
        let mut s: u32 = 99;
        let mut next = move |n: u32| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) % n
        };
        for &(batch, m, k, o, amax, relu, per_channel) in &[
            (1usize, 4usize, 16usize, 8usize, 127u32, false, true),
            (2, 5, 33, 7, 255, true, false),
            (3, 9, 130, 66, 127, true, true),
            (1, 64, 300, 40, 255, false, true),
            (1, 600, 20, 120, 255, true, true),
        ] {
            let n = batch * m * k;
            let xq: Vec<u8> = (0..n).map(|_| next(amax + 1) as u8).collect();
            let codes: Vec<i8> = (0..o * k).map(|_| next(256) as u8 as i8).collect();
            let scales: Vec<f32> = if per_channel {
                (0..o).map(|i| 0.001 + 0.0001 * i as f32).collect()
            } else {
                vec![0.002]
            };
            let w = QuantizedWeight::from_codes(codes, &[o, k], &scales).unwrap();
            let bias: Vec<f32> = (0..o).map(|i| (i as f32 - 3.0) * 0.05).collect();
            let (xs, xzp, ys, yzp) = (0.02f32, next(amax + 1) as i32, 0.03f32, 60);
            let hi = amax as i32;
            let rq = Requant::new(ys, yzp, 0, hi).unwrap().with_relu(relu);
            let shape: Vec<usize> = if batch > 1 {
                vec![batch, m, k]
            } else {
                vec![m, k]
            };
            let x = Tensor::from_vec(xq.clone(), shape.as_slice(), &Device::Cpu).unwrap();
            let y = quantized_linear(&x, xs, xzp, &w, Some(&bias), &rq).unwrap();
            let mut want_shape = shape.clone();
            *want_shape.last_mut().unwrap() = o;
            assert_eq!(y.dims(), want_shape.as_slice());
            assert_eq!(y.dtype(), DType::U8);
            let got = y.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            let want = reference(&xq, xs, xzp, &w, &bias, ys, yzp, rq.lowest_code(), hi);
            assert_eq!(got, want);
        }
    }

    #[test]
    fn rejects_bad_input() {
        let w = QuantizedWeight::from_codes(vec![1, 2, 3, 4], &[2, 2], &[0.1]).unwrap();
        let rq = Requant::new(0.1, 0, 0, 255).unwrap();
        let xf = Tensor::new(&[[1.0f32, 2.0]], &Device::Cpu).unwrap();
        assert!(matches!(
            quantized_linear(&xf, 0.1, 0, &w, None, &rq),
            Err(Error::Tensor { .. })
        ));
        let x3 = Tensor::new(&[[1u8, 2, 3]], &Device::Cpu).unwrap();
        assert!(quantized_linear(&x3, 0.1, 0, &w, None, &rq).is_err());
        let x = Tensor::new(&[[1u8, 2]], &Device::Cpu).unwrap();
        assert!(quantized_linear(&x, 0.1, 300, &w, None, &rq).is_err());
        assert!(quantized_linear(&x, 0.1, 0, &w, Some(&[1.0]), &rq).is_err());
        let w4 = QuantizedWeight::from_codes(vec![1; 4], &[1, 1, 2, 2], &[0.1]).unwrap();
        assert!(quantized_linear(&x, 0.1, 0, &w4, None, &rq).is_err());
        let ok = quantized_linear(&x, 0.1, 0, &w, None, &rq).unwrap();
        assert_eq!(ok.dims(), &[1, 2]);
        let empty = Tensor::zeros((0, 2), candle_core::DType::U8, &Device::Cpu).unwrap();
        let y = quantized_linear(&empty, 0.1, 0, &w, None, &rq).unwrap();
        assert_eq!(y.dims(), &[0, 2]);
    }
}
