//! Symmetric int8 weights: the codes, their scales, and the copy laid out for the kernels.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::gemm::{PackedWeight, MAX_ROW_LEN};
use super::qtensor::{clamp_nan_lo, round_small};
use crate::error::{Error, Result};
use crate::qparams::check_scale;

/// Symmetric int8 weights (`qint8`, zero point 0) with one scale for the whole tensor or one
/// per output channel (axis 0), for [`quantized_linear`](super::quantized_linear) (shape
/// `(out, in)`) and [`quantized_conv2d`](super::quantized_conv2d) (shape
/// `(out, in / groups, kh, kw)`); any rank >= 1 is accepted, each slice along axis 0 being
/// one output channel's row.
///
/// candle has no `i8` dtype, so the codes are kept as a `Vec<i8>` (not a tensor). Next to
/// them the weight keeps, built once at construction, a copy laid out for the GEMM kernels
/// (rows padded with zeros to a multiple of 4 codes) and each row's code sum (for the
/// activation zero-point correction `x_zp * sum_k w[o][k]`). Cloning is cheap: that copy is
/// shared.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::quantized::QuantizedWeight;
/// let w = Tensor::new(&[[0.50390625f32, -1.0, 0.25], [0.02, 0.01, -0.03]], &Device::Cpu)?;
/// let q = QuantizedWeight::quantize(&w, &[1.0 / 128.0, 0.03 / 127.0], -128, 127)?;
/// // 0.50390625 * 128 = 64.5 is a tie: it rounds to even.
/// assert_eq!(q.codes(), &[64, -128, 32, 85, 42, -127]);
/// assert_eq!(q.shape(), &[2, 3]);
/// assert!(q.is_per_channel());
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone)]
pub struct QuantizedWeight {
    codes: Vec<i8>,
    shape: Vec<usize>,
    scales: Vec<f32>,
    packed: Arc<PackedWeight>,
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedWeight")
            .field("shape", &self.shape)
            .field("per_channel", &self.is_per_channel())
            .finish_non_exhaustive()
    }
}

impl QuantizedWeight {
    /// Quantizes float weights with the given scales (one, or one per output channel):
    /// `w_q = clamp(round_half_even(w * (1 / scale)), quant_min, quant_max)`, the reciprocal
    /// taken in f32 and multiplied, as PyTorch's `quantize_per_tensor` /
    /// `quantize_per_channel` (axis 0) with zero point 0.
    ///
    /// Errors when `w` has no elements or contains NaN, when the scales are not one or one
    /// per output channel, or not finite and positive, when the range is not inside
    /// `-128..=127` or does not contain 0, or when a row is longer than [`MAX_ROW_LEN`].
    pub fn quantize(w: &Tensor, scales: &[f32], quant_min: i32, quant_max: i32) -> Result<Self> {
        if quant_min < -128 || quant_max > 127 || quant_min >= quant_max {
            return Err(Error::qparams(
                format!("weight range {quant_min}..={quant_max} is not a signed 8-bit range"),
                "give -128 <= quant_min < quant_max <= 127 (qint8 weights use -128..=127)",
            ));
        }
        if quant_min > 0 || quant_max < 0 {
            return Err(Error::qparams(
                format!("weight range {quant_min}..={quant_max} does not contain the zero point 0"),
                "symmetric weights need quant_min <= 0 <= quant_max",
            ));
        }
        let shape = w.dims().to_vec();
        let (rows, row_len) = check_layout(&shape, scales)?;
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = data.iter().position(|v| v.is_nan()) {
            return Err(Error::tensor(
                format!("the weight has NaN at flat index {i}"),
                "fix the float model (NaN weights have no int8 code)",
            ));
        }
        let (lo, hi) = (quant_min as f32, quant_max as f32);
        let mut codes = Vec::with_capacity(data.len());
        for (r, row) in data.chunks(row_len).enumerate() {
            let s = if scales.len() == 1 {
                scales[0]
            } else {
                scales[r]
            };
            let inv = 1.0 / s;
            codes.extend(
                row.iter()
                    .map(|&v| round_small(clamp_nan_lo(v * inv, lo, hi)) as i8),
            );
        }
        let packed = Arc::new(PackedWeight::new(&codes, rows, row_len));
        Ok(QuantizedWeight {
            codes,
            shape,
            scales: scales.to_vec(),
            packed,
        })
    }

    /// Weights from int8 codes already computed (row-major, `shape`), with one scale or one
    /// per output channel (`shape[0]`).
    ///
    /// ```
    /// use qat_core::quantized::QuantizedWeight;
    /// let q = QuantizedWeight::from_codes(vec![1, -2, 3, -4, 5, -6], &[3, 2], &[0.5])?;
    /// assert_eq!(q.scales(), &[0.5]);
    /// assert!(QuantizedWeight::from_codes(vec![1, 2, 3], &[2, 2], &[0.5]).is_err());
    /// # Ok::<(), qat_core::Error>(())
    /// ```
    pub fn from_codes(codes: Vec<i8>, shape: &[usize], scales: &[f32]) -> Result<Self> {
        let (rows, row_len) = check_layout(shape, scales)?;
        if codes.len() != rows * row_len {
            return Err(Error::tensor(
                format!(
                    "{} weight codes for the shape {shape:?} ({} elements)",
                    codes.len(),
                    rows * row_len
                ),
                "give one code per element of the shape, row-major",
            ));
        }
        let packed = Arc::new(PackedWeight::new(&codes, rows, row_len));
        Ok(QuantizedWeight {
            codes,
            shape: shape.to_vec(),
            scales: scales.to_vec(),
            packed,
        })
    }

    /// The int8 codes, row-major in [`shape`](Self::shape).
    pub fn codes(&self) -> &[i8] {
        &self.codes
    }

    /// The scales: one, or one per output channel.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The weight's shape, `(out, ...)`.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The codes and scales as a plain record (for the ONNX exporter's trace).
    pub(crate) fn to_record(&self) -> crate::record::WeightCodes {
        crate::record::WeightCodes {
            codes: self.codes.clone(),
            shape: self.shape.clone(),
            scales: self.scales.clone(),
        }
    }

    /// Whether there is more than one scale (one per output channel).
    pub fn is_per_channel(&self) -> bool {
        self.scales.len() > 1
    }

    /// Output channels (`shape[0]`).
    pub fn out_channels(&self) -> usize {
        self.shape[0]
    }

    /// Codes per output channel (the product of `shape[1..]`).
    pub fn row_len(&self) -> usize {
        self.packed.row_len
    }

    /// The scale of output channel `row`.
    pub fn scale(&self, row: usize) -> f32 {
        if self.scales.len() == 1 {
            self.scales[0]
        } else {
            self.scales[row]
        }
    }

    /// The float weights the codes stand for, `w_q * scale`, as an f32 tensor on `device`.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let len = self.row_len();
        let data: Vec<f32> = self
            .codes
            .chunks(len)
            .enumerate()
            .flat_map(|(r, row)| {
                let s = self.scale(r);
                row.iter().map(move |&c| c as f32 * s)
            })
            .collect();
        Ok(Tensor::from_vec(data, self.shape.as_slice(), device)?)
    }

    pub(crate) fn packed(&self) -> &PackedWeight {
        &self.packed
    }
}

/// Checks a weight shape and its scales; returns (rows, row length).
fn check_layout(shape: &[usize], scales: &[f32]) -> Result<(usize, usize)> {
    let Some((&rows, rest)) = shape.split_first() else {
        return Err(Error::tensor(
            "a weight of rank 0",
            "give weights of shape (out, in) or (out, in / groups, kh, kw)",
        ));
    };
    let row_len: usize = rest.iter().product();
    if rows == 0 || row_len == 0 {
        return Err(Error::tensor(
            format!("a weight of shape {shape:?} has no elements"),
            "give weights with at least one output channel and one input",
        ));
    }
    if row_len > MAX_ROW_LEN {
        return Err(Error::tensor(
            format!(
                "weight rows of {row_len} codes exceed the {MAX_ROW_LEN} an i32 sum holds exactly"
            ),
            "split the layer along its inputs and add the partial outputs",
        ));
    }
    if scales.len() != 1 && scales.len() != rows {
        return Err(Error::qparams(
            format!("{} weight scales for {rows} output channels", scales.len()),
            "give one scale (per tensor) or one per output channel (axis 0)",
        ));
    }
    for &s in scales {
        check_scale(s)?;
    }
    Ok((rows, row_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_matches_reference() {
        let (o, k) = (5, 13);
        let data: Vec<f32> = (0..o * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let w = Tensor::from_vec(data.clone(), (o, k), &Device::Cpu).unwrap();
        let scales: Vec<f32> = (0..o).map(|r| 0.004 + 0.001 * r as f32).collect();
        let q = QuantizedWeight::quantize(&w, &scales, -128, 127).unwrap();
        for (i, (&c, &v)) in q.codes().iter().zip(&data).enumerate() {
            let s = scales[i / k];
            let want = (v * (1.0f32 / s)).round_ties_even().clamp(-128.0, 127.0) as i8;
            assert_eq!(c, want, "{i}");
        }
        let qt = QuantizedWeight::quantize(&w, &[0.01], -127, 127).unwrap();
        assert!(!qt.is_per_channel());
        assert!(qt.codes().iter().all(|&c| c >= -127));
        let back = q.dequantize(&Device::Cpu).unwrap();
        assert_eq!(back.dims(), &[o, k]);
    }

    #[test]
    fn ties_at_the_range_edge() {
        // The largest |w| on exactly +-127.5 steps: +127.5 -> 128 -> clamped to 127;
        // -127.5 -> -128.
        let s = 2.0f32 / 255.0;
        let w = Tensor::new(&[[127.5f32 * s, -127.5 * s]], &Device::Cpu).unwrap();
        let q = QuantizedWeight::quantize(&w, &[s], -128, 127).unwrap();
        let inv = 1.0f32 / s;
        let want: Vec<i8> = [127.5f32 * s, -127.5 * s]
            .iter()
            .map(|v| (v * inv).round_ties_even().clamp(-128.0, 127.0) as i8)
            .collect();
        assert_eq!(q.codes(), want.as_slice());
    }

    #[test]
    fn rejects_bad_input() {
        let w = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        for (scales, lo, hi) in [
            (vec![0.1f32; 3], -128, 127),
            (vec![0.0f32], -128, 127),
            (vec![0.1f32], -129, 127),
            (vec![0.1f32], 1, 127),
            (vec![0.1f32], 0, 0),
        ] {
            assert!(QuantizedWeight::quantize(&w, &scales, lo, hi).is_err());
        }
        let nan = Tensor::new(&[[f32::NAN, 1.0]], &Device::Cpu).unwrap();
        assert!(matches!(
            QuantizedWeight::quantize(&nan, &[0.1], -128, 127),
            Err(Error::Tensor { .. })
        ));
        assert!(QuantizedWeight::from_codes(vec![], &[0, 3], &[0.1]).is_err());
        assert!(QuantizedWeight::from_codes(vec![1], &[], &[0.1]).is_err());
        let q = QuantizedWeight::from_codes(vec![1, 2, 3, 4], &[2, 2], &[0.1, 0.2]).unwrap();
        assert_eq!((q.out_channels(), q.row_len()), (2, 2));
        assert_eq!(q.scale(1), 0.2);
        assert!(format!("{q:?}").contains("[2, 2]"));
    }
}
