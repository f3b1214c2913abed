//! The value an int8 layer rounds, computed from candle ops: exact integer accumulation (in
//! f64, exact below 2^53) of `(x_q - x_zp) * w_q`, converted to f32 like the kernels' i32,
//! then `acc * (x_scale * w_scale) + bias` in f32. Prepared layers use it in eval mode so that
//! the fake-quant model and the converted model round the very same numbers.

use candle_core::{DType, Tensor};

use super::conv::ConvConfig;
use super::weighted::IntBias;
use crate::error::Result;
use crate::quantized::QuantizedWeight;

fn codes_f64(w: &QuantizedWeight, x: &Tensor) -> Result<Tensor> {
    let v: Vec<f64> = w.codes().iter().map(|&c| c as f64).collect();
    Ok(Tensor::from_vec(v, w.shape(), x.device())?)
}

fn rescale(acc: &Tensor, x_scale: f32, w: &QuantizedWeight, bias: &IntBias, dim: usize) -> Result<Tensor> {
    let o = w.out_channels();
    let m: Vec<f32> = (0..o).map(|c| x_scale * w.scale(c)).collect();
    let mut shape = vec![1; acc.rank()];
    shape[dim] = o;
    let m = Tensor::from_vec(m, shape.as_slice(), acc.device())?;
    let bi: Vec<f64> = bias.int.iter().map(|&b| b as f64).collect();
    let bi = Tensor::from_vec(bi, shape.as_slice(), acc.device())?;
    let bf = Tensor::from_vec(bias.float.clone(), shape.as_slice(), acc.device())?;
    // (acc + int bias) is an exact integer in f64; its f32 conversion rounds as i32 -> f32.
    let acc = acc.broadcast_add(&bi)?.to_dtype(DType::F32)?;
    Ok(acc.broadcast_mul(&m)?.broadcast_add(&bf)?)
}

/// Linear: `xq` is (.., in) u8 codes.
pub(crate) fn linear_prerequant(
    xq: &Tensor,
    x_scale: f32,
    x_zp: i32,
    w: &QuantizedWeight,
    bias: &IntBias,
) -> Result<Tensor> {
    let x = (xq.to_dtype(DType::F64)? - x_zp as f64)?;
    let wt = codes_f64(w, &x)?.t()?;
    let acc = if x.rank() == 2 { x.matmul(&wt)? } else { x.broadcast_matmul(&wt)? };
    rescale(&acc, x_scale, w, bias, acc.rank() - 1)
}

/// Conv2d: `xq` is (N, C, H, W) u8 codes; padding contributes `x - x_zp = 0`.
pub(crate) fn conv2d_prerequant(
    xq: &Tensor,
    x_scale: f32,
    x_zp: i32,
    w: &QuantizedWeight,
    bias: &IntBias,
    c: &ConvConfig,
) -> Result<Tensor> {
    let x = (xq.to_dtype(DType::F64)? - x_zp as f64)?;
    let acc = x.conv2d(&codes_f64(w, &x)?, c.padding, c.stride, c.dilation, c.groups)?;
    rescale(&acc, x_scale, w, bias, 1)
}
