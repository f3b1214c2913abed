//! Requantization: from exact i32 sums to the next layer's u8 codes.

use multiversion::multiversion;

use std::ops::Range;

use super::gemm::{gemm_codes, Fused, PackedWeight, Panel, Path};
use super::qtensor::{check_u8_range, clamp_nan_lo, code_from_clamped};
use super::weight::QuantizedWeight;
use crate::error::{Error, Result};
use crate::qparams::check_scale;

/// The output side of an int8 layer: the output's scale and zero point, the clamp range
/// `quant_min..=quant_max`, and an optional fused ReLU.
///
/// Each output channel `c` turns its i32 sum into a code, in f32 and in exactly this order:
///
/// `y_q = clamp(y_zp + round_half_even(((acc + int_bias[c]) * (x_scale * w_scale[c]) + bias[c]) * (1 / y_scale)), lo, hi)`
///
/// (`int_bias` is 0 unless an engine quantizes the bias to int32, as qnnpack does; the
/// reciprocal is the one the output's fake-quant multiplies by, so the codes are the ones the
/// fake-quant model rounds to.)
///
/// with `hi = quant_max` and `lo = quant_min`, or `max(quant_min, y_zp)` with ReLU (the code
/// of 0.0). `acc` is converted to f32, exactly while `|acc| < 2^24` (always for rows of up
/// to 514 codes; typical layers stay far below 2^24 in practice, and beyond it the sum keeps
/// 24 significant bits, far finer than one output step), as PyTorch's kernels do.
///
/// The range must be the one the output's fake-quant trained with: `0..=127` for the
/// fbgemm/x86 presets (`reduce_range`), `0..=255` for qnnpack. PyTorch's int8 kernels clamp
/// to `0..=255` whatever the preset, which lets an x86 model leave the range its QAT model
/// saw; clamping here keeps the converted model equal to the fake-quant one.
///
/// ```
/// use qat_core::quantized::Requant;
/// let out = Requant::new(0.05, 10, 0, 127)?.with_relu(true);
/// assert_eq!(out.lowest_code(), 10);
/// assert_eq!(out.quant_max(), 127);
/// assert!(Requant::new(0.05, 200, 0, 127).is_err());
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Requant {
    scale: f32,
    zero_point: i32,
    quant_min: i32,
    quant_max: i32,
    relu: bool,
}

impl Requant {
    /// Output qparams and clamp range, no ReLU. Errors when the scale is not finite and
    /// positive, the range not inside `0..=255`, or the zero point outside the range.
    pub fn new(scale: f32, zero_point: i32, quant_min: i32, quant_max: i32) -> Result<Self> {
        check_scale(scale)?;
        check_u8_range(zero_point, quant_min, quant_max, "output")?;
        Ok(Requant {
            scale,
            zero_point,
            quant_min,
            quant_max,
            relu: false,
        })
    }

    /// With (or without) a fused ReLU: codes below the zero point become the zero point.
    pub fn with_relu(mut self, relu: bool) -> Self {
        self.relu = relu;
        self
    }

    /// Output scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Output zero point.
    pub fn zero_point(&self) -> i32 {
        self.zero_point
    }

    /// Lowest code of the range.
    pub fn quant_min(&self) -> i32 {
        self.quant_min
    }

    /// Highest code of the range.
    pub fn quant_max(&self) -> i32 {
        self.quant_max
    }

    /// Whether a ReLU is fused.
    pub fn relu(&self) -> bool {
        self.relu
    }

    /// The lowest code written: `quant_min`, or `max(quant_min, zero_point)` with ReLU.
    pub fn lowest_code(&self) -> i32 {
        if self.relu {
            self.quant_min.max(self.zero_point)
        } else {
            self.quant_min
        }
    }

    /// Per-channel factors for a layer with input scale `x_scale`, weights `w` and `bias`.
    pub(crate) fn plan(
        &self,
        x_scale: f32,
        w: &QuantizedWeight,
        bias: Option<&[f32]>,
    ) -> Result<Plan> {
        Ok(self.plan_with(Affine::new(x_scale, w, bias)?))
    }

    /// The plan for a given affine part (e.g. with an int32 bias).
    pub(crate) fn plan_with(&self, affine: Affine) -> Plan {
        let zp = self.zero_point as f32;
        Plan {
            affine,
            grid: Grid {
                inv_scale: 1.0 / self.scale,
                zero_point: zp,
                lo: self.lowest_code() as f32 - zp,
                hi: self.quant_max as f32 - zp,
            },
        }
    }
}

/// What a layer makes of its output channels' i32 sums.
pub(crate) trait Epilogue: Sync {
    /// The output element.
    type Out: candle_core::WithDType;
    /// Outputs of channel `o` from its sums.
    fn row(&self, o: usize, acc: &[i32], out: &mut [Self::Out]);
    /// The output of one sum of channel `o` (the reference the row kernels are tested
    /// against).
    #[allow(dead_code)]
    fn one(&self, o: usize, acc: i32) -> Self::Out;
    /// Output channels `rows` (`out`: `rows.len()` rows of the panel's positions) straight
    /// from a kernel that applies this epilogue in registers, where one can
    /// ([`gemm_codes`]); `false` when nothing was done (then compute the sums and call
    /// [`row`](Epilogue::row)).
    fn gemm_into(
        &self,
        _path: Path,
        _w: &PackedWeight,
        _rows: Range<usize>,
        _panel: &Panel,
        _x_zp: i32,
        _out: &mut [Self::Out],
    ) -> Result<bool> {
        Ok(false)
    }
}

/// The float value before requantization, per output channel `c`:
/// `(acc + int_bias[c]) * (x_scale * w_scale[c]) + bias[c]`, in f32 (the sum with the int32
/// bias is exact, then converted to f32).
pub(crate) struct Affine {
    mult: Vec<f32>,
    bias: Vec<f32>,
    int_bias: Vec<i32>,
}

impl Affine {
    pub(crate) fn new(x_scale: f32, w: &QuantizedWeight, bias: Option<&[f32]>) -> Result<Self> {
        check_scale(x_scale)?;
        let rows = w.out_channels();
        if let Some(b) = bias {
            if b.len() != rows {
                return Err(Error::tensor(
                    format!("{} bias values for {rows} output channels", b.len()),
                    "give one bias per output channel, or none",
                ));
            }
        }
        Ok(Affine {
            mult: (0..rows).map(|o| x_scale * w.scale(o)).collect(),
            bias: bias.map_or_else(|| vec![0.0; rows], <[f32]>::to_vec),
            int_bias: vec![0; rows],
        })
    }

    /// Adds an int32 bias (in units of `x_scale * w_scale[c]`) to the sums.
    pub(crate) fn with_int_bias(mut self, int_bias: &[i32]) -> Result<Self> {
        if int_bias.len() != self.mult.len() {
            return Err(Error::tensor(
                format!(
                    "{} int32 bias values for {} output channels",
                    int_bias.len(),
                    self.mult.len()
                ),
                "give one bias per output channel",
            ));
        }
        self.int_bias = int_bias.to_vec();
        Ok(self)
    }
}

impl Epilogue for Affine {
    type Out = f32;

    fn row(&self, o: usize, acc: &[i32], out: &mut [f32]) {
        affine_row(acc, out, self.int_bias[o], self.mult[o], self.bias[o]);
    }

    #[inline]
    fn one(&self, o: usize, acc: i32) -> f32 {
        affine(acc, self.int_bias[o], self.mult[o], self.bias[o])
    }
}

#[derive(Clone, Copy)]
struct Grid {
    inv_scale: f32,
    zero_point: f32,
    /// Bounds relative to the zero point.
    lo: f32,
    hi: f32,
}

/// Per-output-channel requantization factors of one layer call.
pub(crate) struct Plan {
    affine: Affine,
    grid: Grid,
}

impl Epilogue for Plan {
    type Out = u8;

    fn row(&self, o: usize, acc: &[i32], out: &mut [u8]) {
        requant_row(
            acc,
            out,
            self.affine.int_bias[o],
            self.affine.mult[o],
            self.affine.bias[o],
            self.grid,
        );
    }

    fn gemm_into(
        &self,
        path: Path,
        w: &PackedWeight,
        rows: Range<usize>,
        panel: &Panel,
        x_zp: i32,
        out: &mut [u8],
    ) -> Result<bool> {
        let a = &self.affine;
        let (Some(mult), Some(bias), Some(int_bias)) = (
            a.mult.get(rows.clone()),
            a.bias.get(rows.clone()),
            a.int_bias.get(rows.clone()),
        ) else {
            return Ok(false);
        };
        // The fused kernels convert the sums straight from i32: no int32 bias.
        if int_bias.iter().any(|&b| b != 0) {
            return Ok(false);
        }
        let g = self.grid;
        let f = Fused {
            mult,
            bias,
            inv_scale: g.inv_scale,
            zero_point: g.zero_point,
            lo: g.lo,
            hi: g.hi,
        };
        gemm_codes(path, w, rows, panel, x_zp, &f, out)
    }

    #[inline]
    fn one(&self, o: usize, acc: i32) -> u8 {
        code(
            acc,
            self.affine.int_bias[o],
            self.affine.mult[o],
            self.affine.bias[o],
            self.grid,
        )
    }
}

/// `(acc + int_bias) * mult + bias` in f32, the sum converted to f32 once (round to
/// nearest even). The sum is exact in f64 (|sum| < 2^32), so converting through f64 rounds
/// as the exact integer would — and vectorises, unlike an i64 to f32 conversion.
#[inline(always)]
fn affine(acc: i32, int_bias: i32, mult: f32, bias: f32) -> f32 {
    affine_sum((acc as f64 + int_bias as f64) as f32, mult, bias)
}

#[inline(always)]
fn affine_sum(sum: f32, mult: f32, bias: f32) -> f32 {
    sum * mult + bias
}

#[inline(always)]
fn code(acc: i32, int_bias: i32, mult: f32, bias: f32, g: Grid) -> u8 {
    code_of(affine(acc, int_bias, mult, bias), g)
}

#[inline(always)]
fn code_of(t: f32, g: Grid) -> u8 {
    code_from_clamped(clamp_nan_lo(t * g.inv_scale, g.lo, g.hi), g.zero_point)
}

/// A row of codes. Without an int32 bias (fbgemm/x86) the sum converts straight from i32
/// (the same rounding as through f64, at twice the speed).
#[multiversion(targets("x86_64+avx2"))]
fn requant_row(acc: &[i32], out: &mut [u8], int_bias: i32, mult: f32, bias: f32, g: Grid) {
    if int_bias == 0 {
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = code_of(affine_sum(a as f32, mult, bias), g);
        }
    } else {
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = code(a, int_bias, mult, bias, g);
        }
    }
}

#[multiversion(targets("x86_64+avx2"))]
fn affine_row(acc: &[i32], out: &mut [f32], int_bias: i32, mult: f32, bias: f32) {
    if int_bias == 0 {
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = affine_sum(a as f32, mult, bias);
        }
    } else {
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = affine(a, int_bias, mult, bias);
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    fn reference(acc: i32, m: f32, b: f32, y_scale: f32, zp: i32, lo: i32, hi: i32) -> u8 {
        let t = (acc as f32 * m + b) * (1.0 / y_scale);
        (zp as i64 + t.round_ties_even() as i64).clamp(lo as i64, hi as i64) as u8
    }

    #[test]
    fn codes_match_reference() {
        let w = QuantizedWeight::from_codes(vec![1, 2, 3, 4, 5, 6], &[3, 2], &[0.01, 0.02, 0.5])
            .unwrap();
        for &(relu, qmin, qmax, zp) in &[
            (false, 0, 127, 40),
            (true, 0, 127, 40),
            (false, 0, 255, 128),
            (true, 3, 200, 3),
            (false, 3, 200, 100),
        ] {
            let rq = Requant::new(0.07, zp, qmin, qmax).unwrap().with_relu(relu);
            let bias = [0.3f32, -0.2, 0.0];
            let plan = rq.plan(0.05, &w, Some(&bias)).unwrap();
            let accs: Vec<i32> = (-3000..3000).step_by(7).collect();
            let lo = rq.lowest_code();
            for o in 0..3 {
                let mut out = vec![0u8; accs.len()];
                plan.row(o, &accs, &mut out);
                let m = 0.05f32 * w.scale(o);
                for (&a, &got) in accs.iter().zip(&out) {
                    let want = reference(a, m, bias[o], 0.07, zp, lo, qmax);
                    assert_eq!(got, want, "acc {a} channel {o}");
                    assert_eq!(plan.one(o, a), want);
                }
            }
        }
    }

    #[test]
    fn ties_round_to_even() {
        // acc * 1 / 2 lands on .5 exactly: 1/2 -> 0, 3/2 -> 2, 5/2 -> 2.
        let w = QuantizedWeight::from_codes(vec![1], &[1, 1], &[1.0]).unwrap();
        let plan = Requant::new(2.0, 100, 0, 255)
            .unwrap()
            .plan(1.0, &w, None)
            .unwrap();
        let mut out = [0u8; 6];
        plan.row(0, &[1, 3, 5, -1, -3, -5], &mut out);
        assert_eq!(out, [100, 102, 102, 100, 98, 98]);
    }

    #[test]
    fn bad_arguments() {
        assert!(Requant::new(0.0, 0, 0, 255).is_err());
        assert!(Requant::new(1.0, 0, 0, 256).is_err());
        assert!(Requant::new(1.0, 0, 10, 10).is_err());
        let w = QuantizedWeight::from_codes(vec![1, 2], &[2, 1], &[1.0]).unwrap();
        let rq = Requant::new(1.0, 0, 0, 255).unwrap();
        assert!(rq.plan(1.0, &w, Some(&[0.0])).is_err());
        assert!(rq.plan(-1.0, &w, None).is_err());
    }
}
