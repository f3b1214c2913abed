//! ConvTranspose1d and ConvTranspose2d with PyTorch's parameter names (`weight` of shape
//! `(in_channels, out_channels / groups, k...)`, `bias`).
//!
//! The float op is the transposed convolution written as a direct one (the input dilated by
//! the stride and padded by `dilation * (k - 1) - padding`, plus `output_padding` at the end;
//! the kernel flipped and transposed; stride 1), so its gradient is the direct convolution's
//! and the int8 kernel ([`crate::quantized`]) is the same formulation on codes.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::weighted::{weighted_module_methods, Weighted};
use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantize;
pub use crate::geometry::ConvTransposeConfig;
use crate::model::{QuantModule, Stage, Staged};
use crate::qconfig::QConfig;
use crate::record::Int8State;

/// `x` dilated along `dim` by `stride` (`stride - 1` zeros between neighbours), then padded
/// with `before` / `after` zeros (cropped where negative). Differentiable.
fn dilate_pad(
    x: &Tensor,
    dim: usize,
    stride: usize,
    before: isize,
    after: isize,
) -> Result<Tensor> {
    let len = x.dim(dim)?;
    let x = if stride > 1 && len > 1 {
        let mut merged = x.dims().to_vec();
        merged[dim] = len * stride;
        x.unsqueeze(dim + 1)?
            .pad_with_zeros(dim + 1, 0, stride - 1)?
            .reshape(merged)?
            .narrow(dim, 0, (len - 1) * stride + 1)?
    } else {
        x.clone()
    };
    let full = x.dim(dim)? as isize;
    let start = (-before).max(0);
    let end = full + after.min(0);
    if end - start <= 0 {
        return Err(Error::tensor(
            "a transposed convolution whose padding removes the whole output",
            "use a smaller padding or a larger input",
        ));
    }
    let x = x.narrow(dim, start as usize, (end - start) as usize)?;
    Ok(x.pad_with_zeros(dim, before.max(0) as usize, after.max(0) as usize)?)
}

/// A transposed-conv weight `(in, out / groups, k...)` as the direct convolution's `(out,
/// in / groups, k...)`, every spatial axis reversed. Differentiable.
fn direct_weight(w: &Tensor, groups: usize) -> Result<Tensor> {
    let dims = w.dims();
    let (cin, opg) = (dims[0], dims[1]);
    let cpg = cin / groups;
    let taps: usize = dims[2..].iter().product();
    let rev: Vec<u32> = (0..taps as u32).rev().collect();
    let rev = Tensor::new(rev.as_slice(), w.device())?;
    let mut shape = vec![groups * opg, cpg];
    shape.extend_from_slice(&dims[2..]);
    Ok(w.reshape((groups, cpg, opg, taps))?
        .transpose(1, 2)?
        .contiguous()?
        .index_select(&rev, 3)?
        .reshape(shape)?)
}

macro_rules! conv_transpose {
    ($name:ident, $rank:literal, $suffix:literal, $doc:literal, $x:literal, $y:literal) => {
        #[doc = $doc]
        ///
        /// Built from a `VarBuilder` with PyTorch's names, so a PyTorch state dict saved as
        /// safetensors loads as is. In QAT its weight goes through the qconfig's weight
        /// fake-quant, per channel along the weight's axis 1 (PyTorch's eager `prepare_qat`
        /// leaves ConvTranspose float and quantizes its weight only at convert; see the
        /// README), and its output through the activation's. Fusable with a following
        /// BatchNorm in eval mode (`fuse_modules`), as PyTorch's `fuse_convtranspose_bn`.
        ///
        /// ```
        /// use candle_core::{DType, Device, Module, Tensor};
        /// use candle_nn::VarBuilder;
        #[doc = concat!("use qat_core::nn::{", stringify!($name), ", ConvTransposeConfig};")]
        /// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        /// let c = ConvTransposeConfig { stride: 2, padding: 1, output_padding: 1, ..Default::default() };
        #[doc = concat!("let up = ", stringify!($name), "::new(4, 2, 3, c, true, vb)?;")]
        #[doc = concat!("let x = Tensor::zeros(", $x, ", DType::F32, &Device::Cpu)?;")]
        #[doc = concat!("assert_eq!(up.forward(&x)?.dims(), ", $y, ");")]
        /// # Ok::<(), Box<dyn std::error::Error>>(())
        /// ```
        #[derive(Clone, Debug)]
        pub struct $name {
            pub(crate) w: Weighted,
            pub(crate) config: ConvTransposeConfig,
        }

        impl $name {
            /// Loads or initialises (Kaiming-normal weight, uniform bias, as candle-nn's
            /// convolutions; fan-in `out_channels / groups * k^rank`, as PyTorch computes it
            /// for transposed weights) a transposed convolution from `in_channels` to
            /// `out_channels` with a `kernel_size` window.
            pub fn new(
                in_channels: usize,
                out_channels: usize,
                kernel_size: usize,
                config: ConvTransposeConfig,
                bias: bool,
                vb: VarBuilder,
            ) -> Result<Self> {
                let name = stringify!($name);
                if config.groups == 0
                    || in_channels % config.groups != 0
                    || out_channels % config.groups != 0
                {
                    return Err(Error::config(
                        format!(
                            "{name} with {in_channels} in, {out_channels} out channels and {} \
                             groups",
                            config.groups
                        ),
                        "use a group count that divides both channel counts",
                    ));
                }
                if config.stride == 0 || config.dilation == 0 || kernel_size == 0 {
                    return Err(Error::config(
                        format!("{name}: stride, dilation and kernel size must be >= 1"),
                        "use positive values",
                    ));
                }
                if config.output_padding >= config.stride.max(config.dilation) {
                    return Err(Error::config(
                        format!(
                            "{name}: output_padding {} with stride {} and dilation {}",
                            config.output_padding, config.stride, config.dilation
                        ),
                        "use output_padding smaller than stride or dilation (as PyTorch \
                         requires)",
                    ));
                }
                let opg = out_channels / config.groups;
                let mut shape = vec![in_channels, opg];
                shape.extend(std::iter::repeat_n(kernel_size, $rank));
                let weight =
                    vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
                let bias = if bias {
                    let bound = 1.0 / ((opg * kernel_size.pow($rank)) as f64).sqrt();
                    Some(vb.get_with_hints(
                        out_channels,
                        "bias",
                        candle_nn::Init::Uniform {
                            lo: -bound,
                            up: bound,
                        },
                    )?)
                } else {
                    None
                };
                Ok($name {
                    w: Weighted::new_transposed(weight, bias, config.groups),
                    config,
                })
            }

            /// The (float) weight, `(in_channels, out_channels / groups, k...)`; after an
            /// eval-mode fusion, the folded one.
            pub fn weight(&self) -> &Tensor {
                &self.w.weight
            }

            /// The (float) bias.
            pub fn bias(&self) -> Option<&Tensor> {
                self.w.bias.as_ref()
            }

            /// The transposed-convolution settings.
            pub fn config(&self) -> &ConvTransposeConfig {
                &self.config
            }

            /// The transposed convolution of `x` with `w`, plus the bias `b` when given.
            pub(crate) fn conv(
                &self,
                x: &Tensor,
                w: &Tensor,
                b: Option<&Tensor>,
            ) -> Result<Tensor> {
                let c = &self.config;
                let spatial = &w.dims()[2..];
                let mut xd = x.clone();
                for (i, &k) in spatial.iter().enumerate() {
                    let (before, after) = c.dilated_padding(k);
                    xd = dilate_pad(&xd, 2 + i, c.stride, before, after)?;
                }
                let wd = direct_weight(w, c.groups)?;
                let fused = crate::kernels::conv::supported(&xd, &wd)
                    && b.is_none_or(|b| b.device().is_cpu() && b.dtype() == wd.dtype());
                let y = match $rank {
                    1 if fused => {
                        return Ok(crate::kernels::conv::conv1d(
                            &xd, &wd, b, 0, 1, c.dilation, c.groups,
                        )?)
                    }
                    2 if fused => {
                        let p =
                            crate::kernels::conv::Conv2dParams::square(0, 1, c.dilation, c.groups);
                        return Ok(match b {
                            Some(b) => crate::kernels::conv::conv2d_bias(&xd, &wd, b, p)?,
                            None => crate::kernels::conv::conv2d(&xd, &wd, p)?,
                        });
                    }
                    1 => xd.conv1d(&wd, 0, 1, c.dilation, c.groups)?,
                    _ => xd.conv2d(&wd, 0, 1, c.dilation, c.groups)?,
                };
                match b {
                    Some(b) => crate::kernels::channel::add_channel(&y, b, 1),
                    None => Ok(y),
                }
            }

            fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
                let name = stringify!($name);
                if x.rank() != $rank + 2 {
                    return Err(Error::tensor(
                        format!(
                            "{name} takes (N, C, {}) inputs but got one of shape {:?}",
                            ["L", "H, W"][$rank - 1],
                            x.dims()
                        ),
                        "reshape the input to the layer's rank (unsqueeze a batch dim of 1)",
                    ));
                }
                let dims = self.w.weight.dims();
                let in_channels = dims[0];
                super::input::check_channels(name, x, 1, in_channels, "in_channels")?;
                if self.w.int().is_none() {
                    super::input::check_dtype(name, x, self.w.weight.dtype())?;
                }
                for (i, &k) in dims[2..].iter().enumerate() {
                    if self.config.out_len(x.dims()[2 + i], k).is_none() {
                        return Err(Error::tensor(
                            format!(
                                "{name} with padding {} gives no output for an input of shape \
                                 {:?}",
                                self.config.padding,
                                x.dims()
                            ),
                            "use a smaller padding or a larger input",
                        ));
                    }
                }
                let kind = crate::record::WeightedKind::ConvTranspose {
                    config: self.config,
                    rank: $rank,
                };
                self.w.forward(x, |_| 1, |x, w, b| self.conv(x, w, b), kind)
            }
        }

        impl Module for $name {
            fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
                Ok(self.forward_t(x).map_err(|e| self.w.common.at_path(e))?)
            }
        }

        impl QuantModule for $name {
            fn kind(&self) -> String {
                self.w.kind("ConvTranspose", $suffix)
            }
            fn type_name(&self) -> &'static str {
                stringify!($name)
            }
            weighted_module_methods!();
            fn stage_convert(&self) -> Result<Staged> {
                self.w.stage_convert(&self.kind(), true)
            }
            fn has_int8_form(&self) -> bool {
                true
            }
        }

        crate::model::leaf_quantizable!($name);
    };
}

conv_transpose!(
    ConvTranspose1d,
    1,
    "1d",
    "1-D transposed convolution over (N, C, L) inputs.",
    "(1, 4, 5)",
    "&[1, 2, 10]"
);
conv_transpose!(
    ConvTranspose2d,
    2,
    "2d",
    "2-D transposed convolution over (N, C, H, W) inputs.",
    "(1, 4, 5, 5)",
    "&[1, 2, 10, 10]"
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The direct formulation against candle's own transposed convolutions (1-D with
    /// groups; 2-D per group), values and gradients (candle's 2-D backward where it has one).
    #[test]
    fn matches_candle_conv_transpose() {
        let dev = Device::Cpu;
        // (cin, cout, k, stride, padding, output_padding, dilation, groups)
        for (cin, cout, k, s, p, op, d, g) in [
            (
                3usize, 4usize, 3usize, 2usize, 1usize, 1usize, 1usize, 1usize,
            ),
            (4, 6, 2, 1, 0, 0, 1, 2),
            (4, 4, 3, 3, 2, 2, 2, 4),
            (2, 3, 4, 2, 3, 0, 1, 1),
            (6, 3, 3, 2, 0, 1, 2, 3),
        ] {
            let c = ConvTransposeConfig {
                padding: p,
                output_padding: op,
                stride: s,
                dilation: d,
                groups: g,
            };
            let vb = VarBuilder::zeros(DType::F32, &dev);
            let mut layer = ConvTranspose2d::new(cin, cout, k, c, false, vb).unwrap();
            let w = Tensor::randn(0f32, 1.0, (cin, cout / g, k, k), &dev).unwrap();
            layer.w.weight = w.clone();
            let x = Tensor::randn(0f32, 1.0, (2, cin, 4, 5), &dev).unwrap();
            let y = layer.forward(&x).unwrap();
            let cpg = cin / g;
            let want: Vec<Tensor> = (0..g)
                .map(|gi| {
                    x.narrow(1, gi * cpg, cpg)
                        .unwrap()
                        .conv_transpose2d(&w.narrow(0, gi * cpg, cpg).unwrap(), p, op, s, d)
                        .unwrap()
                })
                .collect();
            let want = Tensor::cat(&want, 1).unwrap();
            assert_eq!(y.dims(), want.dims());
            let diff = (&y - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "{:?}: {diff}", (cin, cout, k, s, p, op, d, g));

            let vb = VarBuilder::zeros(DType::F32, &dev);
            let mut l1 = ConvTranspose1d::new(cin, cout, k, c, true, vb).unwrap();
            let w1 = Tensor::randn(0f32, 1.0, (cin, cout / g, k), &dev).unwrap();
            let b1 = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            l1.w.weight = w1.clone();
            l1.w.bias = Some(b1.clone());
            let x1 = Tensor::randn(0f32, 1.0, (2, cin, 6), &dev).unwrap();
            let y1 = l1.forward(&x1).unwrap();
            let want1 = x1
                .conv_transpose1d(&w1, p, op, s, d, g)
                .unwrap()
                .broadcast_add(&b1.reshape((1, cout, 1)).unwrap())
                .unwrap();
            assert_eq!(y1.dims(), want1.dims());
            let diff1 = (&y1 - &want1)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff1 < 1e-4,
                "1-D {:?}: {diff1}",
                (cin, cout, k, s, p, op, d, g)
            );
        }
    }

    #[test]
    fn rejects_bad_settings_and_inputs() {
        let dev = Device::Cpu;
        let vb = VarBuilder::zeros(DType::F32, &dev);
        let bad_groups = ConvTransposeConfig {
            groups: 3,
            ..Default::default()
        };
        assert!(ConvTranspose2d::new(4, 6, 3, bad_groups, true, vb.clone()).is_err());
        let bad_op = ConvTransposeConfig {
            output_padding: 2,
            stride: 2,
            ..Default::default()
        };
        assert!(ConvTranspose2d::new(4, 6, 3, bad_op, true, vb.clone()).is_err());
        let l = ConvTranspose2d::new(4, 6, 3, ConvTransposeConfig::default(), true, vb).unwrap();
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let e = l.forward(&x).unwrap_err().to_string();
        assert!(e.contains("in_channels"), "{e}");
        let x = Tensor::zeros((1, 4, 4), DType::F32, &dev).unwrap();
        assert!(l.forward(&x).is_err());
    }
}
