//! Quantized integer types, quantization schemes, ranges and the computation of scale and
//! zero point from observed min/max values, exactly as PyTorch's
//! `UniformQuantizationObserverBase._calculate_qparams`.

use crate::error::{Error, Result};

/// The integer type values are quantized to: a bit width from 2 to 8, signed or unsigned.
///
/// `QDType::QUINT8` and `QDType::QINT8` are PyTorch's `torch.quint8` and `torch.qint8`.
/// Narrower widths are expressed in PyTorch as an 8-bit dtype with a custom
/// `quant_min`/`quant_max`, and behave exactly like that here.
///
/// ```
/// use qat_core::QDType;
/// let q4 = QDType::new(4, false)?;
/// assert_eq!((q4.min(), q4.max()), (0, 15));
/// assert_eq!((QDType::QINT8.min(), QDType::QINT8.max()), (-128, 127));
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QDType {
    bits: u8,
    signed: bool,
}

impl QDType {
    /// Unsigned 8-bit, 0..=255 (`torch.quint8`).
    pub const QUINT8: QDType = QDType {
        bits: 8,
        signed: false,
    };
    /// Signed 8-bit, -128..=127 (`torch.qint8`).
    pub const QINT8: QDType = QDType {
        bits: 8,
        signed: true,
    };

    /// A `bits`-wide integer type, 2 <= bits <= 8.
    pub fn new(bits: u8, signed: bool) -> Result<Self> {
        if !(2..=8).contains(&bits) {
            return Err(Error::config(
                format!("bit width {bits} is outside 2..=8"),
                "choose a width from 2 to 8 bits",
            ));
        }
        Ok(QDType { bits, signed })
    }

    /// Bit width.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Whether the type is signed.
    pub fn is_signed(&self) -> bool {
        self.signed
    }

    /// Smallest representable code.
    pub fn min(&self) -> i32 {
        if self.signed {
            -(1 << (self.bits - 1))
        } else {
            0
        }
    }

    /// Largest representable code.
    pub fn max(&self) -> i32 {
        if self.signed {
            (1 << (self.bits - 1)) - 1
        } else {
            (1 << self.bits) - 1
        }
    }

    /// The 8-bit container PyTorch would use for this type (`quint8` or `qint8`).
    pub fn container(&self) -> QDType {
        if self.signed {
            QDType::QINT8
        } else {
            QDType::QUINT8
        }
    }
}

impl std::fmt::Display for QDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let prefix = if self.signed { "qint" } else { "quint" };
        write!(f, "{prefix}{}", self.bits)
    }
}

/// How scale and zero point are chosen and shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QScheme {
    /// One scale and zero point; range from min to max.
    PerTensorAffine,
    /// One scale; zero point fixed at the middle of the range.
    PerTensorSymmetric,
    /// A scale and zero point per slice along a channel axis.
    PerChannelAffine,
    /// A scale per slice along a channel axis; zero point fixed.
    PerChannelSymmetric,
}

impl QScheme {
    /// Whether qparams are per channel.
    pub fn is_per_channel(&self) -> bool {
        matches!(
            self,
            QScheme::PerChannelAffine | QScheme::PerChannelSymmetric
        )
    }

    /// Whether the zero point is fixed (symmetric quantization).
    pub fn is_symmetric(&self) -> bool {
        matches!(
            self,
            QScheme::PerTensorSymmetric | QScheme::PerChannelSymmetric
        )
    }

    /// PyTorch's name (`per_tensor_affine`, ...).
    pub fn torch_name(&self) -> &'static str {
        match self {
            QScheme::PerTensorAffine => "per_tensor_affine",
            QScheme::PerTensorSymmetric => "per_tensor_symmetric",
            QScheme::PerChannelAffine => "per_channel_affine",
            QScheme::PerChannelSymmetric => "per_channel_symmetric",
        }
    }
}

impl std::fmt::Display for QScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// The effective integer range `quant_min..=quant_max` after `reduce_range`, as PyTorch's
/// `calculate_qmin_qmax` computes it.
///
/// ```
/// use qat_core::{QDType, QuantRange};
/// // fbgemm/x86 activations: quint8 with reduce_range trains in 0..=127.
/// let r = QuantRange::new(QDType::QUINT8, None, true)?;
/// assert_eq!((r.quant_min(), r.quant_max()), (0, 127));
/// // A custom range is halved with floor division.
/// let r = QuantRange::new(QDType::QINT8, Some((-8, 7)), true)?;
/// assert_eq!((r.quant_min(), r.quant_max()), (-4, 3));
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantRange {
    dtype: QDType,
    quant_min: i32,
    quant_max: i32,
    customized: bool,
}

impl QuantRange {
    /// The range for `dtype`, optionally a custom `(quant_min, quant_max)` inside the dtype's
    /// codes, halved when `reduce_range` is set. Widths below 8 bits count as a custom range
    /// (that is how PyTorch expresses them).
    pub fn new(dtype: QDType, custom: Option<(i32, i32)>, reduce_range: bool) -> Result<Self> {
        let customized = custom.is_some() || dtype.bits() < 8;
        let (qmin, qmax) = custom.unwrap_or((dtype.min(), dtype.max()));
        if qmin >= qmax {
            return Err(Error::config(
                format!("quant_min {qmin} is not below quant_max {qmax}"),
                "give a range with quant_min < quant_max",
            ));
        }
        if qmin > 0 || qmax < 0 {
            return Err(Error::config(
                format!("the range {qmin}..={qmax} does not contain 0"),
                "give a range with quant_min <= 0 <= quant_max so that 0.0 is exactly representable",
            ));
        }
        if qmin < dtype.min() || qmax > dtype.max() {
            return Err(Error::config(
                format!(
                    "the range {qmin}..={qmax} does not fit {dtype} ({}..={})",
                    dtype.min(),
                    dtype.max()
                ),
                "choose a range inside the dtype, or a wider dtype",
            ));
        }
        let (quant_min, quant_max) = if !reduce_range {
            (qmin, qmax)
        } else if customized {
            (qmin.div_euclid(2), qmax.div_euclid(2))
        } else if dtype.is_signed() {
            (-64, 63)
        } else {
            (0, 127)
        };
        if quant_min >= quant_max {
            return Err(Error::config(
                format!(
                    "reduce_range halves {qmin}..={qmax} to quant_min {quant_min}, quant_max \
                     {quant_max}: quant_min is no longer below quant_max"
                ),
                "use a wider range, or turn reduce_range off",
            ));
        }
        Ok(QuantRange {
            dtype,
            quant_min,
            quant_max,
            customized,
        })
    }

    /// The dtype's whole range, as PyTorch's default (non-customized) range.
    pub fn full(dtype: QDType) -> Self {
        QuantRange {
            dtype,
            quant_min: dtype.min(),
            quant_max: dtype.max(),
            customized: false,
        }
    }

    /// Explicit bounds, as a bare fake-quant op takes them (PyTorch's
    /// `fake_quantize_per_tensor_affine` only asks `quant_min < quant_max`). Bounds are
    /// limited to +-2^20 so that codes stay exact in f32.
    pub fn explicit(quant_min: i32, quant_max: i32) -> Result<Self> {
        const LIMIT: i32 = 1 << 20;
        if quant_min >= quant_max {
            return Err(Error::config(
                format!("quant_min {quant_min} is not below quant_max {quant_max}"),
                "give quant_min < quant_max",
            ));
        }
        if quant_min < -LIMIT || quant_max > LIMIT {
            return Err(Error::config(
                format!("the range {quant_min}..={quant_max} exceeds +-2^20"),
                "fake quantization supports ranges of up to 21 bits",
            ));
        }
        let dtype = if quant_min < 0 {
            QDType::QINT8
        } else {
            QDType::QUINT8
        };
        Ok(QuantRange {
            dtype,
            quant_min,
            quant_max,
            customized: true,
        })
    }

    /// Lowest code.
    pub fn quant_min(&self) -> i32 {
        self.quant_min
    }

    /// Highest code.
    pub fn quant_max(&self) -> i32 {
        self.quant_max
    }

    /// The dtype this range belongs to.
    pub fn dtype(&self) -> QDType {
        self.dtype
    }

    /// Whether the range was customized (PyTorch's `has_customized_qrange`).
    pub fn is_customized(&self) -> bool {
        self.customized
    }

    /// Checks that a zero point lies in the range.
    pub fn check_zero_point(&self, zero_point: i32) -> Result<()> {
        if zero_point < self.quant_min || zero_point > self.quant_max {
            return Err(Error::qparams(
                format!(
                    "zero point {zero_point} is outside the range {}..={}",
                    self.quant_min, self.quant_max
                ),
                "use a zero point inside quant_min..=quant_max",
            ));
        }
        Ok(())
    }
}

/// Scale and zero point, one pair per tensor or one per channel.
#[derive(Clone, Debug, PartialEq)]
pub enum QParams {
    /// One scale and zero point for the whole tensor.
    PerTensor {
        /// Step between codes.
        scale: f32,
        /// Code of 0.0.
        zero_point: i32,
    },
    /// A scale and zero point for each slice along `axis`.
    PerChannel {
        /// Steps, one per channel.
        scale: Vec<f32>,
        /// Codes of 0.0, one per channel.
        zero_point: Vec<i32>,
        /// The channel axis.
        axis: usize,
    },
}

impl QParams {
    /// The scales as a slice (one element per tensor).
    pub fn scales(&self) -> &[f32] {
        match self {
            QParams::PerTensor { scale, .. } => std::slice::from_ref(scale),
            QParams::PerChannel { scale, .. } => scale,
        }
    }

    /// The zero points as a slice (one element per tensor).
    pub fn zero_points(&self) -> &[i32] {
        match self {
            QParams::PerTensor { zero_point, .. } => std::slice::from_ref(zero_point),
            QParams::PerChannel { zero_point, .. } => zero_point,
        }
    }

    /// Checks every scale is finite and positive and every zero point lies in `range`.
    pub fn validate(&self, range: &QuantRange) -> Result<()> {
        if self.scales().len() != self.zero_points().len() {
            return Err(Error::qparams(
                format!(
                    "{} scales but {} zero points",
                    self.scales().len(),
                    self.zero_points().len()
                ),
                "give one zero point per scale",
            ));
        }
        for &s in self.scales() {
            check_scale(s)?;
        }
        for &z in self.zero_points() {
            range.check_zero_point(z)?;
        }
        Ok(())
    }
}

/// Checks that a scale is finite and strictly positive.
pub(crate) fn check_scale(scale: f32) -> Result<()> {
    if !(scale.is_finite() && scale > 0.0 && (1.0 / scale).is_finite()) {
        return Err(Error::qparams(
            format!("scale {scale} is not a finite positive number (with a finite reciprocal)"),
            "use a scale > 0 and above ~3e-39 (observers floor it at eps)",
        ));
    }
    Ok(())
}

/// Round half to even, as `torch.round` and `std::nearbyint` do.
#[inline]
pub(crate) fn round_half_even(x: f32) -> f32 {
    x.round_ties_even()
}

/// Scale and zero point for one min/max pair, exactly as PyTorch computes them in f32.
///
/// `min_val > max_val` (an observer that has seen nothing keeps `+inf, -inf`) is the caller's
/// concern: see [`calculate_qparams`].
pub(crate) fn qparams_from_min_max(
    min_val: f32,
    max_val: f32,
    symmetric: bool,
    range: &QuantRange,
    eps: f32,
) -> (f32, i32) {
    let (qmin, qmax) = (range.quant_min, range.quant_max);
    let min_neg = if min_val < 0.0 { min_val } else { 0.0 };
    let max_pos = if max_val > 0.0 { max_val } else { 0.0 };
    if symmetric {
        let max_abs = if -min_neg > max_pos {
            -min_neg
        } else {
            max_pos
        };
        let half_range = ((qmax - qmin) as f64 / 2.0) as f32;
        let scale = (max_abs / half_range).max(eps);
        let zero_point = if range.dtype.is_signed() {
            0
        } else if range.customized {
            (qmin + qmax).div_euclid(2)
        } else {
            128
        };
        (scale, zero_point)
    } else {
        let scale = ((max_pos - min_neg) / (qmax - qmin) as f32).max(eps);
        let zero_point = qmin as i64 - round_half_even(min_neg / scale) as i64;
        let zero_point = zero_point.clamp(qmin as i64, qmax as i64) as i32;
        (scale, zero_point)
    }
}

/// Computes qparams from running min/max values (one pair per tensor or per channel).
///
/// An observer that has seen nothing (empty slices, or `min = +inf, max = -inf`) gives
/// PyTorch's default `(1.0, 0)`.
///
/// ```
/// use qat_core::{calculate_qparams, QDType, QParams, QScheme, QuantRange};
/// let range = QuantRange::new(QDType::QUINT8, None, false)?;
/// let qp = calculate_qparams(&[-1.0], &[3.0], QScheme::PerTensorAffine, &range, f32::EPSILON, None)?;
/// assert_eq!(qp, QParams::PerTensor { scale: 4.0 / 255.0, zero_point: 64 });
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn calculate_qparams(
    min_val: &[f32],
    max_val: &[f32],
    qscheme: QScheme,
    range: &QuantRange,
    eps: f32,
    ch_axis: Option<usize>,
) -> Result<QParams> {
    if min_val.len() != max_val.len() {
        return Err(Error::qparams(
            format!("{} minima but {} maxima", min_val.len(), max_val.len()),
            "give one min and one max per channel",
        ));
    }
    let unobserved = min_val.is_empty()
        || min_val
            .iter()
            .zip(max_val)
            .all(|(&mn, &mx)| mn == f32::INFINITY && mx == f32::NEG_INFINITY);
    if unobserved {
        return Ok(QParams::PerTensor {
            scale: 1.0,
            zero_point: 0,
        });
    }
    if let Some((i, (mn, mx))) = min_val
        .iter()
        .zip(max_val)
        .enumerate()
        .find(|(_, (mn, mx))| {
            matches!(mn.partial_cmp(mx), None | Some(std::cmp::Ordering::Greater))
        })
    {
        return Err(Error::qparams(
            format!("min {mn} > max {mx} at channel {i}"),
            "feed the observer real data before asking for qparams, or reset it",
        ));
    }
    let symmetric = qscheme.is_symmetric();
    let (scale, zero_point): (Vec<f32>, Vec<i32>) = min_val
        .iter()
        .zip(max_val)
        .map(|(&mn, &mx)| qparams_from_min_max(mn, mx, symmetric, range, eps))
        .unzip();
    if qscheme.is_per_channel() {
        Ok(QParams::PerChannel {
            scale,
            zero_point,
            axis: ch_axis.unwrap_or(0),
        })
    } else {
        Ok(QParams::PerTensor {
            scale: scale[0],
            zero_point: zero_point[0],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_ranges() {
        assert_eq!(
            QDType::new(4, true).map(|d| (d.min(), d.max())).ok(),
            Some((-8, 7))
        );
        assert_eq!(
            QDType::new(2, false).map(|d| (d.min(), d.max())).ok(),
            Some((0, 3))
        );
        assert!(matches!(QDType::new(1, true), Err(Error::Config { .. })));
        assert!(matches!(QDType::new(9, false), Err(Error::Config { .. })));
    }

    #[test]
    fn range_checks() {
        assert!(QuantRange::new(QDType::QINT8, Some((3, 3)), false).is_err());
        assert!(QuantRange::new(QDType::QINT8, Some((5, 3)), false).is_err());
        assert!(QuantRange::new(QDType::QUINT8, Some((1, 255)), false).is_err());
        assert!(QuantRange::new(QDType::QINT8, Some((-200, 3)), false).is_err());
        let r = QuantRange::new(QDType::QUINT8, Some((0, 15)), true).unwrap();
        assert_eq!((r.quant_min(), r.quant_max()), (0, 7));
        let r = QuantRange::new(QDType::QINT8, None, true).unwrap();
        assert_eq!((r.quant_min(), r.quant_max()), (-64, 63));
    }

    #[test]
    fn symmetric_zero_points() {
        let eps = f32::EPSILON;
        let u8r = QuantRange::new(QDType::QUINT8, None, false).unwrap();
        assert_eq!(qparams_from_min_max(-1.0, 1.0, true, &u8r, eps).1, 128);
        let u4 = QuantRange::new(QDType::new(4, false).unwrap(), None, false).unwrap();
        assert_eq!(qparams_from_min_max(-1.0, 1.0, true, &u4, eps).1, 7);
        let i8r = QuantRange::new(QDType::QINT8, None, false).unwrap();
        let (s, z) = qparams_from_min_max(-2.0, 1.0, true, &i8r, eps);
        assert_eq!((s, z), (2.0 / 127.5, 0));
    }

    #[test]
    fn eps_floor_and_unobserved() {
        let r = QuantRange::new(QDType::QUINT8, None, false).unwrap();
        let qp =
            calculate_qparams(&[0.0], &[0.0], QScheme::PerTensorAffine, &r, 1e-3, None).unwrap();
        assert_eq!(
            qp,
            QParams::PerTensor {
                scale: 1e-3,
                zero_point: 0
            }
        );
        let qp = calculate_qparams(
            &[f32::INFINITY],
            &[f32::NEG_INFINITY],
            QScheme::PerTensorAffine,
            &r,
            1e-3,
            None,
        )
        .unwrap();
        assert_eq!(
            qp,
            QParams::PerTensor {
                scale: 1.0,
                zero_point: 0
            }
        );
    }

    #[test]
    fn validate_rejects_bad_qparams() {
        let r = QuantRange::new(QDType::QUINT8, None, false).unwrap();
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let qp = QParams::PerTensor {
                scale: bad,
                zero_point: 0,
            };
            assert!(matches!(qp.validate(&r), Err(Error::QParams { .. })));
        }
        let qp = QParams::PerTensor {
            scale: 1.0,
            zero_point: 256,
        };
        assert!(qp.validate(&r).is_err());
    }
}
