//! Conv1d, Conv2d and Conv3d with PyTorch's parameter names (`weight`, `bias`). Conv3d is
//! built from candle's conv2d (candle has no 3-D convolution).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::weighted::{weighted_module_methods, Weighted};
use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantize;
pub use crate::geometry::ConvConfig;
use crate::model::{QuantModule, Stage, Staged};
use crate::qconfig::QConfig;
use crate::record::Int8State;

/// 3-D convolution from 2-D ones: one conv2d per kernel depth tap on the input depth slices
/// it reads, summed.
pub(crate) fn conv3d(x: &Tensor, w: &Tensor, c: &ConvConfig) -> Result<Tensor> {
    let (n, cin, d, h, wd) = x.dims5()?;
    let (o, _cpg, kd, _kh, _kw) = w.dims5()?;
    let x = if c.padding > 0 {
        x.pad_with_zeros(2, c.padding, c.padding)?
    } else {
        x.clone()
    };
    let dp = d + 2 * c.padding;
    let span = c.dilation * (kd - 1) + 1;
    if dp < span {
        return Err(Error::tensor(
            format!("Conv3d kernel depth {kd} does not fit input depth {d}"),
            "use a deeper input or more padding",
        ));
    }
    let od = (dp - span) / c.stride + 1;
    let mut acc: Option<Tensor> = None;
    for k in 0..kd {
        let idx: Vec<u32> = (0..od)
            .map(|i| (i * c.stride + k * c.dilation) as u32)
            .collect();
        let idx = Tensor::new(idx.as_slice(), x.device())?;
        // (N, C, OD, H, W) -> (N*OD, C, H, W)
        let slices = x
            .index_select(&idx, 2)?
            .permute((0, 2, 1, 3, 4))?
            .reshape((n * od, cin, h, wd))?;
        let wk = w.narrow(2, k, 1)?.squeeze(2)?.contiguous()?;
        let y = slices.conv2d(&wk, c.padding, c.stride, c.dilation, c.groups)?;
        acc = Some(match acc {
            Some(a) => (a + y)?,
            None => y,
        });
    }
    let y = acc.ok_or_else(|| Error::tensor("Conv3d kernel of depth 0", "use kernel_size >= 1"))?;
    let (_, _, oh, ow) = y.dims4()?;
    Ok(y.reshape((n, od, o, oh, ow))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()?)
}

macro_rules! conv {
    ($name:ident, $rank:literal, $suffix:literal, $doc:literal) => {
        #[doc = $doc]
        ///
        /// Built from a `VarBuilder` with PyTorch's names, so a PyTorch state dict saved as
        /// safetensors loads as is. Fusable with BatchNorm and ReLU (see `fuse`).
        #[derive(Clone, Debug)]
        pub struct $name {
            pub(crate) w: Weighted,
            pub(crate) config: ConvConfig,
        }

        impl $name {
            /// Loads or initialises (Kaiming-normal weight, uniform bias, as candle-nn) a
            /// convolution from `in_channels` to `out_channels` with a `kernel_size` window.
            pub fn new(
                in_channels: usize,
                out_channels: usize,
                kernel_size: usize,
                config: ConvConfig,
                bias: bool,
                vb: VarBuilder,
            ) -> Result<Self> {
                if config.groups == 0
                    || in_channels % config.groups != 0
                    || out_channels % config.groups != 0
                {
                    return Err(Error::config(
                        format!(
                            "{} with {in_channels} in, {out_channels} out channels and {} groups",
                            stringify!($name),
                            config.groups
                        ),
                        "use a group count that divides both channel counts",
                    ));
                }
                if config.stride == 0 || config.dilation == 0 || kernel_size == 0 {
                    return Err(Error::config(
                        format!(
                            "{}: stride, dilation and kernel size must be >= 1",
                            stringify!($name)
                        ),
                        "use positive values",
                    ));
                }
                let mut shape = vec![out_channels, in_channels / config.groups];
                shape.extend(std::iter::repeat_n(kernel_size, $rank));
                let weight =
                    vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
                let bias = if bias {
                    let bound = 1.0
                        / ((in_channels / config.groups * kernel_size.pow($rank)) as f64).sqrt();
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
                    w: Weighted::new(weight, bias),
                    config,
                })
            }

            /// The (float) weight; after an eval-mode fusion, the folded one.
            pub fn weight(&self) -> &Tensor {
                &self.w.weight
            }

            /// The (float) bias.
            pub fn bias(&self) -> Option<&Tensor> {
                self.w.bias.as_ref()
            }

            /// Running mean and variance of a BatchNorm fused in for QAT.
            pub fn bn_running_stats(&self) -> Option<(Tensor, Tensor)> {
                self.w.bn.as_ref().map(|b| {
                    (
                        b.running_mean.as_tensor().clone(),
                        b.running_var.as_tensor().clone(),
                    )
                })
            }

            /// The convolution settings.
            pub fn config(&self) -> &ConvConfig {
                &self.config
            }

            /// The convolution of `x` with `w`, plus the bias `b` when given (inside the fused
            /// kernel's op on the CPU).
            pub(crate) fn conv(
                &self,
                x: &Tensor,
                w: &Tensor,
                b: Option<&Tensor>,
            ) -> Result<Tensor> {
                let c = &self.config;
                if x.rank() != $rank + 2 {
                    return Err(Error::tensor(
                        format!("{} got an input of shape {:?}", stringify!($name), x.dims()),
                        concat!("feed ", stringify!($name), " a (N, C, spatial...) tensor"),
                    ));
                }
                // CPU f32: the fused im2col + GEMM kernels with their own backward.
                let fused = crate::kernels::conv::supported(x, w)
                    && b.is_none_or(|b| b.device().is_cpu() && b.dtype() == w.dtype());
                let y = match $rank {
                    1 if fused => {
                        return Ok(crate::kernels::conv::conv1d(
                            x, w, b, c.padding, c.stride, c.dilation, c.groups,
                        )?)
                    }
                    2 if fused => {
                        let p = crate::kernels::conv::Conv2dParams::square(
                            c.padding, c.stride, c.dilation, c.groups,
                        );
                        return Ok(match b {
                            Some(b) => crate::kernels::conv::conv2d_bias(x, w, b, p)?,
                            None => crate::kernels::conv::conv2d(x, w, p)?,
                        });
                    }
                    1 => x.conv1d(w, c.padding, c.stride, c.dilation, c.groups)?,
                    2 => x.conv2d(w, c.padding, c.stride, c.dilation, c.groups)?,
                    _ => conv3d(x, w, c)?,
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
                            ["L", "H, W", "D, H, W"][$rank - 1],
                            x.dims()
                        ),
                        "reshape the input to the layer's rank (unsqueeze a batch dim of 1)",
                    ));
                }
                // Converted, the int8 weight is what runs: its shape is the authority.
                let per_group = match self.w.int() {
                    Some(int) => int.weight.shape()[1],
                    None => self.w.weight.dims()[1],
                };
                let in_channels = per_group * self.config.groups;
                super::input::check_channels(name, x, 1, in_channels, "in_channels")?;
                if self.w.int().is_none() {
                    super::input::check_dtype(name, x, self.w.weight.dtype())?;
                }
                let kind = crate::record::WeightedKind::Conv {
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
                self.w.kind("Conv", $suffix)
            }
            fn type_name(&self) -> &'static str {
                stringify!($name)
            }
            weighted_module_methods!();
            fn set_bn_frozen(&mut self, frozen: bool) {
                self.w.bn_frozen = frozen;
            }
            fn stage_convert(&self) -> Result<Staged> {
                self.w.stage_convert(&self.kind(), $rank <= 2)
            }
            fn has_int8_form(&self) -> bool {
                $rank <= 2
            }
        }

        crate::model::leaf_quantizable!($name);
    };
}

conv!(Conv1d, 1, "1d", "1-D convolution over (N, C, L) inputs.");
conv!(Conv2d, 2, "2d", "2-D convolution over (N, C, H, W) inputs.");
conv!(
    Conv3d,
    3,
    "3d",
    "3-D convolution over (N, C, D, H, W) inputs."
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Conv3d against a direct loop.
    #[test]
    fn conv3d_matches_direct_reference() {
        let dev = Device::Cpu;
        let (n, ci, o, d, h, w, k) = (2, 4, 4, 5, 6, 5, 3);
        for (pad, stride, dil, groups) in [(0, 1, 1, 1), (1, 2, 1, 2), (1, 1, 2, 1), (2, 2, 1, 4)] {
            let x = Tensor::randn(0f32, 1., (n, ci, d, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (o, ci / groups, k, k, k), &dev).unwrap();
            let c = ConvConfig {
                padding: pad,
                stride,
                dilation: dil,
                groups,
            };
            let y = conv3d(&x, &wt, &c).unwrap();
            let xf: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let wf: Vec<f32> = wt.flatten_all().unwrap().to_vec1().unwrap();
            let out = |i: usize| (i + 2 * pad - dil * (k - 1) - 1) / stride + 1;
            let (od, oh, ow) = (out(d), out(h), out(w));
            assert_eq!(y.dims(), &[n, o, od, oh, ow]);
            let yf: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let cpg = ci / groups;
            let opg = o / groups;
            for b in 0..n {
                for oc in 0..o {
                    let g = oc / opg;
                    for z in 0..od {
                        for yy in 0..oh {
                            for xx in 0..ow {
                                let mut acc = 0f64;
                                for icg in 0..cpg {
                                    let ic = g * cpg + icg;
                                    for a in 0..k {
                                        for bb in 0..k {
                                            for cc in 0..k {
                                                let iz =
                                                    (z * stride + a * dil) as isize - pad as isize;
                                                let iy = (yy * stride + bb * dil) as isize
                                                    - pad as isize;
                                                let ix = (xx * stride + cc * dil) as isize
                                                    - pad as isize;
                                                if iz < 0
                                                    || iy < 0
                                                    || ix < 0
                                                    || iz >= d as isize
                                                    || iy >= h as isize
                                                    || ix >= w as isize
                                                {
                                                    continue;
                                                }
                                                let xi = (((b * ci + ic) * d + iz as usize) * h
                                                    + iy as usize)
                                                    * w
                                                    + ix as usize;
                                                let wi =
                                                    (((oc * cpg + icg) * k + a) * k + bb) * k + cc;
                                                acc += xf[xi] as f64 * wf[wi] as f64;
                                            }
                                        }
                                    }
                                }
                                let yi = (((b * o + oc) * od + z) * oh + yy) * ow + xx;
                                assert!(
                                    (yf[yi] as f64 - acc).abs() < 1e-4 * (1.0 + acc.abs()),
                                    "{pad} {stride} {dil} {groups}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
