//! Average pooling on activation codes with PyTorch's int8 arithmetic: the output keeps the
//! input's scale and zero point, each window's codes are summed exactly in i32, and one
//! rounding gives the output code (`quantized::avg_pool2d` / `adaptive_avg_pool2d`).

use candle_core::Tensor;

use crate::error::{Error, Result};

/// One output position's window along one spatial axis: the input range `start..end` it
/// reads and `span`, what it counts in the divisor (the window's length including zero
/// padding for `AvgPool2d`'s `count_include_pad`, the range's length otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolBin {
    /// First input index read.
    pub start: usize,
    /// One past the last input index read.
    pub end: usize,
    /// The window length the divisor counts.
    pub span: usize,
}

impl PoolBin {
    /// The bins of a window of `kernel` every `stride` over `len` inputs with `padding` zeros
    /// on each side (PyTorch's `avg_pool2d` with `ceil_mode=False`): `None` when no window
    /// fits.
    pub fn sliding(len: usize, kernel: usize, stride: usize, padding: usize) -> Option<Vec<Self>> {
        if kernel == 0 || stride == 0 || len + 2 * padding < kernel {
            return None;
        }
        let out = (len + 2 * padding - kernel) / stride + 1;
        Some(
            (0..out)
                .map(|o| {
                    // Padded coordinates: the window covers lo..hi of 0..len + 2 * padding.
                    let lo = o * stride;
                    let hi = (lo + kernel).min(len + 2 * padding);
                    PoolBin {
                        start: lo.saturating_sub(padding).min(len),
                        end: hi.saturating_sub(padding).min(len),
                        span: hi - lo,
                    }
                })
                .collect(),
        )
    }

    /// PyTorch's adaptive bins of `len` inputs to `out` outputs:
    /// `floor(o * len / out) .. ceil((o + 1) * len / out)`.
    pub fn adaptive(len: usize, out: usize) -> Vec<Self> {
        (0..out)
            .map(|o| {
                let start = o * len / out;
                let end = ((o + 1) * len).div_ceil(out);
                PoolBin {
                    start,
                    end,
                    span: end - start,
                }
            })
            .collect()
    }
}

/// How an int8 average pool turns a window's sum into a code: the multiplier `m` of
/// `round_half_even(acc * m)` for a window counting `n` values, both engines computing it in
/// f32 from the (equal) input and output scales.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PoolRounding {
    /// PyTorch's own kernels (fbgemm and x86 engines): `m = in_scale / out_scale / n` =
    /// `1 / n`.
    Fbgemm,
    /// QNNPACK's average pooling: `m = in_scale / (out_scale * n)` with the activation's
    /// `scale`, which can differ from `1 / n` in the last bit.
    Qnnpack {
        /// The input's (and output's) scale.
        scale: f32,
    },
}

impl PoolRounding {
    fn multiplier(self, n: usize) -> f32 {
        match self {
            PoolRounding::Fbgemm => 1.0f32 / n as f32,
            PoolRounding::Qnnpack { scale } => scale / (scale * n as f32),
        }
    }
}

/// Average pooling of `x`, codes `(N, C, H, W)` (`U8`), over the windows `rows` x `cols`:
/// `y = clamp(zero_point + round_half_even(acc * m), quant_min, quant_max)` with
/// `acc = sum(q) - zero_point * count` (the codes read, exact in i32) and `m` the engine's
/// multiplier for `row span * col span` values ([`PoolRounding`]): PyTorch's quantized
/// kernels, clamped to the range the activation trained with.
pub fn avg_pool2d_codes(
    x: &Tensor,
    rows: &[PoolBin],
    cols: &[PoolBin],
    zero_point: i32,
    (quant_min, quant_max): (i32, i32),
    rounding: PoolRounding,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4().map_err(|_| {
        Error::tensor(
            format!("average pooling got codes of shape {:?}", x.dims()),
            "feed a (N, C, H, W) tensor",
        )
    })?;
    if x.dtype() != candle_core::DType::U8 {
        return Err(Error::tensor(
            format!("average pooling on codes got a {:?} tensor", x.dtype()),
            "pass u8 activation codes",
        ));
    }
    let fits = |bins: &[PoolBin], len: usize| {
        bins.iter()
            .all(|b| b.start <= b.end && b.end <= len && b.span >= 1 && b.span < 1 << 20)
    };
    if !(0 <= quant_min && quant_min <= zero_point && zero_point <= quant_max && quant_max <= 255) {
        return Err(Error::qparams(
            format!("code range {quant_min}..={quant_max} with zero point {zero_point}"),
            "use a range inside 0..=255 that holds the zero point",
        ));
    }
    if h == 0 || w == 0 || !fits(rows, h) || !fits(cols, w) {
        return Err(Error::tensor(
            format!("pooling windows outside an input of {h}x{w}"),
            "build the windows for this input size",
        ));
    }
    let codes: Vec<u8> = x.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(n * c * rows.len() * cols.len());
    for plane in codes.chunks_exact(h * w) {
        for r in rows {
            for col in cols {
                let mut sum: i64 = 0;
                for i in r.start..r.end {
                    let row = &plane[i * w + col.start..i * w + col.end];
                    sum += row.iter().map(|&q| q as i64).sum::<i64>();
                }
                let count = ((r.end - r.start) * (col.end - col.start)) as i64;
                let acc = (sum - zero_point as i64 * count) as f32;
                let m = rounding.multiplier(r.span * col.span);
                let q = zero_point as f32 + (acc * m).round_ties_even();
                out.push(q.clamp(quant_min as f32, quant_max as f32) as u8);
            }
        }
    }
    Ok(Tensor::from_vec(
        out,
        (n, c, rows.len(), cols.len()),
        x.device(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bins_follow_pytorch() {
        // adaptive 5 -> 3: [0,2), [1,4), [3,5)
        let b = PoolBin::adaptive(5, 3);
        let se: Vec<(usize, usize)> = b.iter().map(|b| (b.start, b.end)).collect();
        assert_eq!(se, [(0, 2), (1, 4), (3, 5)]);
        // kernel 3, stride 2, padding 1 over 4: windows -1..2, 1..4 (padded 0..3, 2..5).
        let b = PoolBin::sliding(4, 3, 2, 1).unwrap();
        assert_eq!(
            b,
            [
                PoolBin {
                    start: 0,
                    end: 2,
                    span: 3
                },
                PoolBin {
                    start: 1,
                    end: 4,
                    span: 3
                }
            ]
        );
        assert!(PoolBin::sliding(1, 3, 1, 0).is_none());
    }

    #[test]
    fn codes_average_with_one_rounding() {
        // 2x2 window, zero point 10: codes 10, 11, 11, 11 -> acc 3, 3/4 = 0.75 -> 1 -> 11;
        // codes 10, 10, 11, 11 -> 2/4 = 0.5 ties to even -> 0 -> 10.
        let x = Tensor::from_vec(
            vec![10u8, 11, 10, 10, 11, 11, 11, 11],
            (1, 1, 2, 4),
            &Device::Cpu,
        )
        .unwrap();
        let rows = PoolBin::sliding(2, 2, 2, 0).unwrap();
        let cols = PoolBin::sliding(4, 2, 2, 0).unwrap();
        let y = avg_pool2d_codes(&x, &rows, &cols, 10, (0, 255), PoolRounding::Fbgemm).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<u8>().unwrap(), [11, 10]);
        // Padding counts in the divisor and reads as the zero point.
        let rows = PoolBin::sliding(2, 2, 2, 1).unwrap();
        let cols = PoolBin::sliding(4, 2, 2, 1).unwrap();
        let y = avg_pool2d_codes(&x, &rows, &cols, 10, (0, 255), PoolRounding::Fbgemm).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 3]);
        // QNNPACK's multiplier s / (s * n) is not always 1 / n in f32.
        let differs = (1..200u32).any(|i| {
            let s = i as f32 * 0.0037;
            PoolRounding::Qnnpack { scale: s }.multiplier(144)
                != PoolRounding::Fbgemm.multiplier(144)
        });
        assert!(differs);
        assert!(avg_pool2d_codes(
            &x.to_dtype(candle_core::DType::F32).unwrap(),
            &rows,
            &cols,
            0,
            (0, 255),
            PoolRounding::Fbgemm
        )
        .is_err());
    }
}
