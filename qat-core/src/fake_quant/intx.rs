//! `IntxSpec`: torchao 0.18's `IntxFakeQuantizeConfig` (integer fake quantization of LLM
//! weights and activations, int1..int8), its presets and its validation.
//!
//! The numerics it selects are torchao's `IntxFakeQuantizer` (see `intx_op`):
//! - per token (asymmetric only, as torchao): `choose_qparams_affine`, one scale per row of
//!   the last dim, `scale = (max(max,0) - min(min,0)) / (qmax - qmin)`, `zp = qmin -
//!   round(min(min,0) / scale)` clamped to the range; eps defaults to the smallest normal of
//!   the input dtype;
//! - per group / per axis, symmetric: `get_group_qparams_symmetric`, `scale = max(|min|,
//!   |max|) / ((qmax - qmin) / 2)`, zero point 0, eps as per token;
//! - per group / per axis, asymmetric: `get_groupwise_affine_qparams` (tinygemm's float zero
//!   point, then truncated to int32 by the quantizer): `scale = (max - min) / (2^b - 1)`,
//!   `zp = trunc(min + scale * 2^(b-1))`, eps defaults to 1e-6.
//!
//! Every step is computed in the input's dtype (f16/bf16 round after each operation, as
//! PyTorch's CPU kernels do) and the scale is then kept in f32.

use crate::error::{Error, Result};

/// How the elements of a tensor share quantization parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntxGranularity {
    /// One scale and zero point per token: every index of the leading dims, over the last
    /// dim (torchao `PerToken()`, activations).
    PerToken,
    /// One per output channel, axis 0 of a 2-D weight (torchao `PerAxis(0)`,
    /// `"per_channel"`).
    PerAxis,
    /// One per `group_size` consecutive elements of the last dim of a 2-D weight (torchao
    /// `PerGroup(group_size)`).
    PerGroup(usize),
}

/// An integer fake-quantization scheme, torchao's `IntxFakeQuantizeConfig`: signed
/// `bits`-bit codes `-(2^(b-1))..=2^(b-1)-1`, a granularity, symmetric or asymmetric
/// qparams, an `eps` floor on the scale, dynamic or static qparams, and optional range
/// learning. Scales are f32 and zero points integers (torchao's defaults
/// `scale_precision=float32`, `zero_point_domain=INT`).
///
/// ```
/// use qat_core::fake_quant::{IntxGranularity, IntxSpec};
/// // torchao's 8da4w: int8 per-token asymmetric activations, int4 per-group weights.
/// let act = IntxSpec::int8_per_token_asym();
/// let w = IntxSpec::int4_per_group(32)?;
/// assert_eq!((act.quant_min(), act.quant_max()), (-128, 127));
/// assert_eq!(w.granularity(), IntxGranularity::PerGroup(32));
/// // Any other scheme through the builder:
/// let w2 = IntxSpec::builder(2).per_axis().asymmetric().build()?;
/// assert!(!w2.is_symmetric());
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IntxSpec {
    bits: u8,
    granularity: IntxGranularity,
    symmetric: bool,
    eps: Option<f32>,
    dynamic: bool,
    range_learning: bool,
}

/// Builds an [`IntxSpec`]; [`IntxSpecBuilder::build`] validates the combination. Defaults as
/// torchao: per axis, symmetric, eps `None`, dynamic, no range learning.
#[derive(Clone, Debug)]
pub struct IntxSpecBuilder {
    spec: IntxSpec,
}

impl IntxSpecBuilder {
    /// One scale per token (requires [`asymmetric`](Self::asymmetric), as torchao).
    pub fn per_token(mut self) -> Self {
        self.spec.granularity = IntxGranularity::PerToken;
        self
    }

    /// One scale per row of a 2-D weight.
    pub fn per_axis(mut self) -> Self {
        self.spec.granularity = IntxGranularity::PerAxis;
        self
    }

    /// One scale per `group_size` elements of the last dim.
    pub fn per_group(mut self, group_size: usize) -> Self {
        self.spec.granularity = IntxGranularity::PerGroup(group_size);
        self
    }

    /// Symmetric qparams (zero point 0), the default.
    pub fn symmetric(mut self) -> Self {
        self.spec.symmetric = true;
        self
    }

    /// Asymmetric qparams.
    pub fn asymmetric(mut self) -> Self {
        self.spec.symmetric = false;
        self
    }

    /// The smallest scale (`None`: torchao's default for the granularity, see the module
    /// docs). Must be finite and positive.
    pub fn eps(mut self, eps: Option<f32>) -> Self {
        self.spec.eps = eps;
        self
    }

    /// Dynamic (`true`, default): qparams recomputed from every input; static (`false`):
    /// computed from the first input and kept.
    pub fn dynamic(mut self, dynamic: bool) -> Self {
        self.spec.dynamic = dynamic;
        self
    }

    /// Learn the scale (and the zero point when asymmetric) as trainable variables
    /// initialised from a first batch (torchao's `range_learning=True`; needs static
    /// qparams).
    pub fn range_learning(mut self, on: bool) -> Self {
        self.spec.range_learning = on;
        self
    }

    /// Validates and returns the spec.
    pub fn build(self) -> Result<IntxSpec> {
        self.spec.validate()?;
        Ok(self.spec)
    }
}

impl IntxSpec {
    /// A builder for `bits`-bit codes (1..=8), per axis, symmetric, dynamic.
    pub fn builder(bits: u8) -> IntxSpecBuilder {
        IntxSpecBuilder {
            spec: IntxSpec {
                bits,
                granularity: IntxGranularity::PerAxis,
                symmetric: true,
                eps: None,
                dynamic: true,
                range_learning: false,
            },
        }
    }

    /// torchao `IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)`: the
    /// dynamic activation scheme of 8da4w and int8-dynamic-activation presets.
    pub fn int8_per_token_asym() -> Self {
        IntxSpec {
            bits: 8,
            granularity: IntxGranularity::PerToken,
            symmetric: false,
            eps: None,
            dynamic: true,
            range_learning: false,
        }
    }

    /// torchao `IntxFakeQuantizeConfig(torch.int4, group_size=group_size)`: symmetric int4
    /// weights, one scale per `group_size` input features (32 in 8da4w).
    pub fn int4_per_group(group_size: usize) -> Result<Self> {
        IntxSpec::builder(4).per_group(group_size).build()
    }

    /// torchao `IntxFakeQuantizeConfig(torch.int8, "per_channel")`: symmetric int8 weights,
    /// one scale per output channel.
    pub fn int8_per_axis() -> Self {
        IntxSpec {
            bits: 8,
            granularity: IntxGranularity::PerAxis,
            symmetric: true,
            eps: None,
            dynamic: true,
            range_learning: false,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(1..=8).contains(&self.bits) {
            return Err(Error::config(
                format!("intx fake quantization has {} bits", self.bits),
                "use 1 to 8 bits (torchao's int1..int8)",
            ));
        }
        if let IntxGranularity::PerGroup(g) = self.granularity {
            if g < 2 {
                return Err(Error::config(
                    format!("group size {g}"),
                    "use a group size of at least 2 that divides the last dim (e.g. 32), \
                     or per_token / per_axis",
                ));
            }
        }
        if self.granularity == IntxGranularity::PerToken && self.symmetric {
            return Err(Error::config(
                "per-token intx fake quantization is asymmetric only (torchao raises \
                 NotImplementedError for symmetric per token)",
                "call .asymmetric() on the builder, or use IntxSpec::int8_per_token_asym()",
            ));
        }
        if let Some(eps) = self.eps {
            if !(eps.is_finite() && eps > 0.0) {
                return Err(Error::config(
                    format!("eps {eps}"),
                    "use a finite positive eps, or None for torchao's default",
                ));
            }
        }
        if self.dynamic && self.range_learning {
            return Err(Error::config(
                "range learning with dynamic qparams (torchao: `is_dynamic` is not \
                 compatible with `range_learning`)",
                "call .dynamic(false) with .range_learning(true)",
            ));
        }
        Ok(())
    }

    /// Bits per code.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// How elements share qparams.
    pub fn granularity(&self) -> IntxGranularity {
        self.granularity
    }

    /// Whether the zero point is fixed at 0.
    pub fn is_symmetric(&self) -> bool {
        self.symmetric
    }

    /// The scale floor as given (`None`: the default of the granularity and dtype).
    pub fn eps(&self) -> Option<f32> {
        self.eps
    }

    /// Whether qparams are recomputed from every input.
    pub fn is_dynamic(&self) -> bool {
        self.dynamic
    }

    /// Whether scale and zero point are trainable.
    pub fn range_learning(&self) -> bool {
        self.range_learning
    }

    /// Smallest code, `-(2^(bits-1))`.
    pub fn quant_min(&self) -> i32 {
        -(1i32 << (self.bits - 1))
    }

    /// Largest code, `2^(bits-1) - 1`.
    pub fn quant_max(&self) -> i32 {
        (1i32 << (self.bits - 1)) - 1
    }

    /// Elements that share one scale for an input of shape `dims`, after checking that the
    /// scheme applies to that shape (per group / per axis: 2-D, group size dividing the last
    /// dim; per token: at least 1-D).
    pub(crate) fn group_len(&self, dims: &[usize]) -> Result<usize> {
        let last = dims.last().copied().ok_or_else(|| {
            Error::tensor(
                "intx fake quantization got a scalar (0-D) tensor",
                "pass a tensor with at least one dim",
            )
        })?;
        let two_d = |what: &str| -> Result<()> {
            if dims.len() != 2 {
                return Err(Error::tensor(
                    format!("{what} intx fake quantization got shape {dims:?}"),
                    "it applies to 2-D weights [out, in] (as torchao); reshape the tensor \
                     to 2-D, or use per_token for activations",
                ));
            }
            Ok(())
        };
        match self.granularity {
            IntxGranularity::PerToken => Ok(last),
            IntxGranularity::PerAxis => {
                two_d("per-axis")?;
                if last < 2 {
                    return Err(Error::tensor(
                        format!("per-axis intx fake quantization of shape {dims:?}"),
                        "torchao needs at least 2 elements per channel; leave this tensor \
                         float",
                    ));
                }
                Ok(last)
            }
            IntxGranularity::PerGroup(g) => {
                two_d("per-group")?;
                if last % g != 0 {
                    let divisors: Vec<String> = [256, 128, 64, 32, 16, 8, 4, 2]
                        .iter()
                        .filter(|&&d| last % d == 0 && d <= last)
                        .map(|d| d.to_string())
                        .collect();
                    return Err(Error::tensor(
                        format!("group size {g} does not divide the last dim of shape {dims:?}"),
                        format!(
                            "use a group size that divides {last} (e.g. {}) or per_axis",
                            if divisors.is_empty() {
                                last.to_string()
                            } else {
                                divisors.join(", ")
                            }
                        ),
                    ));
                }
                Ok(g)
            }
        }
    }

    /// The shape torchao gives the scale and zero point for an input of shape `dims`: the
    /// leading dims per token, `[rows, groups]` per group, `[rows, 1]` per axis.
    pub(crate) fn qparams_shape(&self, dims: &[usize]) -> Result<Vec<usize>> {
        let g = self.group_len(dims)?;
        Ok(match self.granularity {
            IntxGranularity::PerToken => dims[..dims.len() - 1].to_vec(),
            _ => vec![dims[0], dims[1] / g],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_torchao_defaults() {
        let a = IntxSpec::int8_per_token_asym();
        assert_eq!(a.granularity(), IntxGranularity::PerToken);
        assert!(!a.is_symmetric() && a.is_dynamic() && a.eps().is_none());
        let w = IntxSpec::int4_per_group(32).unwrap();
        assert_eq!((w.quant_min(), w.quant_max()), (-8, 7));
        assert!(w.is_symmetric());
        let c = IntxSpec::int8_per_axis();
        assert_eq!(c, IntxSpec::builder(8).build().unwrap());
        let one = IntxSpec::builder(1).build().unwrap();
        assert_eq!((one.quant_min(), one.quant_max()), (-1, 0));
    }

    fn config_err(r: Result<IntxSpec>, needle: &str) {
        match r {
            Err(Error::Config { what, fix }) => {
                assert!(
                    what.contains(needle) || fix.contains(needle),
                    "{what}; {fix}"
                )
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn bad_bits_group_eps_and_combinations_are_errors() {
        config_err(IntxSpec::builder(0).build(), "1 to 8 bits");
        config_err(IntxSpec::builder(9).build(), "1 to 8 bits");
        config_err(IntxSpec::int4_per_group(1), "at least 2");
        config_err(IntxSpec::int4_per_group(0), "at least 2");
        config_err(IntxSpec::builder(8).per_token().build(), ".asymmetric()");
        for eps in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            config_err(
                IntxSpec::builder(8).eps(Some(eps)).build(),
                "finite positive",
            );
        }
        config_err(
            IntxSpec::builder(8).range_learning(true).build(),
            ".dynamic(false)",
        );
        assert!(IntxSpec::builder(8)
            .dynamic(false)
            .range_learning(true)
            .build()
            .is_ok());
    }

    #[test]
    fn shapes_are_checked() {
        let w = IntxSpec::int4_per_group(32).unwrap();
        assert_eq!(w.group_len(&[4, 64]).unwrap(), 32);
        assert_eq!(w.qparams_shape(&[4, 64]).unwrap(), vec![4, 2]);
        let e = w.group_len(&[4, 48]).unwrap_err().to_string();
        assert!(e.contains("does not divide") && e.contains("16"), "{e}");
        let e = w.group_len(&[2, 4, 64]).unwrap_err().to_string();
        assert!(e.contains("2-D"), "{e}");
        let a = IntxSpec::int8_per_token_asym();
        assert_eq!(a.qparams_shape(&[2, 3, 32]).unwrap(), vec![2, 3]);
        assert!(a.group_len(&[]).is_err());
        let c = IntxSpec::int8_per_axis();
        assert_eq!(c.qparams_shape(&[8, 40]).unwrap(), vec![8, 1]);
        assert!(c.group_len(&[8, 1]).is_err());
    }
}
