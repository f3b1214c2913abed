//! Fusion: the type-level table of patterns ([`Fusable`], with [`FuseWith`] as the point
//! where a user's own layer types join it) and the BatchNorm folding math of PyTorch's
//! `torch.nn.utils.fusion`.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::{FuseMode, ModulePath, Stage};
use crate::nn::common::{GroupTrace, Member, Placeholder};
use crate::nn::weighted::Weighted;
use crate::nn::{
    BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormInner, Conv1d, Conv2d, Conv3d, ConvTranspose1d,
    ConvTranspose2d, Linear, ReLU,
};

/// One declared group being fused: where it lives and its members' field names.
#[derive(Clone, Copy, Debug)]
pub struct FuseGroup<'a> {
    /// Path of the struct that declares the group.
    pub path: &'a ModulePath,
    /// The members' field names, head first.
    pub members: &'a [&'static str],
    /// Fold BN (eval) or keep it live (QAT).
    pub mode: FuseMode,
}

impl FuseGroup<'_> {
    fn member_paths(&self) -> Vec<String> {
        self.members.iter().map(|m| self.path.join(m)).collect()
    }

    fn error(&self, e: Error) -> Error {
        e.in_module(self.path.join(self.members.first().copied().unwrap_or("?")))
    }
}

/// A tuple of layers that can be fused into one module, in forward order: what
/// `#[qat(fuse(a, b, ..))]` calls. Implemented for every pair and triple whose head
/// implements [`FuseWith`] for the rest: PyTorch's eager fusion table, and any pattern you
/// add by implementing [`FuseWith`] for your own layer type.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a fusion pattern candle-qat supports",
    label = "these layer types cannot be fused together",
    note = "supported, in forward order: (Conv1d, BatchNorm1d), (Conv2d, BatchNorm2d), \
            (Conv3d, BatchNorm3d), each with a ReLU after; (Conv1d|Conv2d|Conv3d, ReLU); \
            (Linear, BatchNorm1d); (Linear, ReLU); (BatchNorm2d|BatchNorm3d, ReLU); \
            (ConvTranspose1d, BatchNorm1d), (ConvTranspose2d, BatchNorm2d) (eval fusion only)",
    note = "to head a group with a layer type of your own, implement \
            `qat_core::fuse::FuseWith<&mut B>` (pair) or `FuseWith<(&mut B, &mut C)>` (triple) \
            for it; a group has two or three members"
)]
pub trait Fusable {
    /// Fuses the members: the first becomes the fused module, the others identity
    /// placeholders.
    fn fuse(self, group: &FuseGroup) -> Result<()>;
}

/// The head of a fusion pattern: `Self` fuses with the members after it, `Rest` (`&mut B`
/// for a pair, `(&mut B, &mut C)` for a triple). candle-qat implements it for PyTorch's eager
/// fusion table; implement it for your own layer type to fuse it in a
/// `#[qat(fuse(..))]` group (the orphan rule allows it: `Self` is your type, while a tuple
/// of layers, even of your own, is a foreign type). Its `fuse_with` usually delegates to the
/// candle-qat layers it holds.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::VarBuilder;
/// use qat_core::fuse::{Fusable, FuseGroup, FuseWith};
/// use qat_core::model::{FuseMode, ModulePath, QuantModule};
/// use qat_core::nn::{Conv2d, ConvConfig, ReLU};
///
/// /// A user's layer: a convolution with its own bookkeeping.
/// struct MyConv {
///     conv: Conv2d,
///     calls: usize,
/// }
///
/// impl<'a> FuseWith<&'a mut ReLU> for MyConv {
///     fn fuse_with(&mut self, relu: &'a mut ReLU, group: &FuseGroup) -> qat_core::Result<()> {
///         self.conv.fuse_with(relu, group) // the table's ConvReLU2d
///     }
/// }
///
/// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
/// let conv = Conv2d::new(1, 4, 3, ConvConfig::default(), true, vb)?;
/// let (mut block, mut relu) = (MyConv { conv, calls: 0 }, ReLU::new());
/// // What `#[qat(fuse(block, relu))]` on a struct holding both fields calls:
/// let root = ModulePath::root();
/// let group = FuseGroup { path: &root, members: &["block", "relu"], mode: FuseMode::Qat };
/// Fusable::fuse((&mut block, &mut relu), &group)?;
/// assert_eq!(block.conv.kind(), "ConvReLU2d");
/// assert_eq!(relu.kind(), "Identity");
/// # Ok::<(), qat_core::Error>(())
/// ```
pub trait FuseWith<Rest> {
    /// Fuses `self` (the head) with the members after it.
    fn fuse_with(&mut self, rest: Rest, group: &FuseGroup) -> Result<()>;
}

// `do_not_recommend`: an unsupported tuple is reported as not `Fusable` (at the group, with
// the table above), not as a missing `FuseWith` impl inside this one.
#[diagnostic::do_not_recommend]
impl<'a, H: FuseWith<&'a mut B>, B> Fusable for (&'a mut H, &'a mut B) {
    fn fuse(self, group: &FuseGroup) -> Result<()> {
        let (head, b) = self;
        head.fuse_with(b, group)
    }
}

#[diagnostic::do_not_recommend]
impl<'a, H: FuseWith<(&'a mut B, &'a mut C)>, B, C> Fusable for (&'a mut H, &'a mut B, &'a mut C) {
    fn fuse(self, group: &FuseGroup) -> Result<()> {
        let (head, b, c) = self;
        head.fuse_with((b, c), group)
    }
}

/// `weight * (bn_w * rsqrt(rv + eps))` along dim 0 and `((b - rm) * rsqrt(rv + eps)) * bn_w +
/// bn_b`, in f32 as PyTorch's `fuse_conv_bn_weights`.
pub fn fold_conv_bn_weights(
    weight: &Tensor,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    bn_weight: &Tensor,
    bn_bias: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let rsqrt = (running_var + eps)?.sqrt()?.recip()?;
    let mut shape = vec![1usize; weight.rank()];
    shape[0] = weight.dims()[0];
    let w = weight.broadcast_mul(&(bn_weight * &rsqrt)?.reshape(shape.as_slice())?)?;
    let b = match bias {
        Some(b) => b.clone(),
        None => running_mean.zeros_like()?,
    };
    let b = (((b - running_mean)? * &rsqrt)? * bn_weight)?.add(bn_bias)?;
    Ok((w, b))
}

/// [`fold_conv_bn_weights`] for a transposed convolution (PyTorch's `fuse_conv_bn_weights`
/// with `transpose=True`): `weight` is `(in_channels, out_channels / groups, k...)`, so output
/// channel `g * (out / groups) + j` is column `j` of the rows of group `g`, and each is scaled
/// by its channel's `bn_w * rsqrt(rv + eps)`. Correct for any `groups`, where PyTorch's
/// reshape of the scale to `(1, -1, 1, ...)` fails once `groups > 1` (pytorch#180995).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::fuse::fold_conv_transpose_bn_weights;
/// // 2 input channels, 2 groups, 1 output channel per group: out channels 0 and 1.
/// let w = Tensor::ones((2, 1, 1, 1), candle_core::DType::F32, &Device::Cpu)?;
/// let ones = Tensor::ones(2, candle_core::DType::F32, &Device::Cpu)?;
/// let zeros = ones.zeros_like()?;
/// let gamma = Tensor::new(&[2f32, 3.0], &Device::Cpu)?;
/// let (wf, bf) = fold_conv_transpose_bn_weights(&w, None, &zeros, &ones, 0.0, &gamma, &zeros, 2)?;
/// assert_eq!(wf.flatten_all()?.to_vec1::<f32>()?, vec![2.0, 3.0]);
/// assert_eq!(bf.to_vec1::<f32>()?, vec![0.0, 0.0]);
/// # Ok::<(), qat_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn fold_conv_transpose_bn_weights(
    weight: &Tensor,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    bn_weight: &Tensor,
    bn_bias: &Tensor,
    groups: usize,
) -> Result<(Tensor, Tensor)> {
    let dims = weight.dims();
    let out = running_mean.elem_count();
    if groups == 0 || dims.len() < 2 || !dims[0].is_multiple_of(groups) || dims[1] * groups != out {
        return Err(Error::tensor(
            format!(
                "a transposed-conv weight of shape {dims:?} with {groups} groups and a \
                 BatchNorm of {out} channels"
            ),
            "give the weight as (in_channels, out_channels / groups, k...) and a BatchNorm \
             over its out_channels",
        ));
    }
    let rsqrt = (running_var + eps)?.sqrt()?.recip()?;
    let scale = (bn_weight * &rsqrt)?;
    // (groups, in / groups, out / groups, k...) times a (groups, 1, out / groups, 1...) scale.
    let mut grouped = vec![groups, dims[0] / groups];
    grouped.extend_from_slice(&dims[1..]);
    let mut scale_shape = vec![groups, 1, dims[1]];
    scale_shape.extend(std::iter::repeat_n(1, dims.len() - 2));
    let w = weight
        .reshape(grouped.as_slice())?
        .broadcast_mul(&scale.reshape(scale_shape.as_slice())?)?
        .reshape(dims)?;
    let b = match bias {
        Some(b) => b.clone(),
        None => running_mean.zeros_like()?,
    };
    let b = (((b - running_mean)? * &rsqrt)? * bn_weight)?.add(bn_bias)?;
    Ok((w, b))
}

/// `weight * (bn_w * rsqrt(rv + eps))[:, None]` and `(b - rm) * (bn_w * rsqrt(rv + eps)) +
/// bn_b`, as PyTorch's `fuse_linear_bn_weights` (a 1-feature BN broadcasts).
pub fn fold_linear_bn_weights(
    weight: &Tensor,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    bn_weight: &Tensor,
    bn_bias: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let scale = bn_weight.mul(&(running_var + eps)?.sqrt()?.recip()?)?;
    let w = weight.broadcast_mul(&scale.unsqueeze(1)?)?;
    let b = match bias {
        Some(b) => b.clone(),
        None => running_mean.zeros_like()?,
    };
    let b = b
        .broadcast_sub(running_mean)?
        .broadcast_mul(&scale)?
        .broadcast_add(bn_bias)?;
    Ok((w, b))
}

fn check_float(stage: Stage, what: &str) -> Result<()> {
    match stage {
        Stage::Float => Ok(()),
        Stage::Fused => Err(Error::pass(
            format!("{what} is already fused"),
            "declare each layer in one group and fuse once",
        )),
        _ => Err(Error::pass(
            format!("{what} was already prepared or converted"),
            "fuse before prepare_qat (fuse_modules_qat, then prepare_qat)",
        )),
    }
}

/// Marks the head and placeholders of a group and records its trace.
fn link<P, C>(
    head: &mut crate::nn::common::Common<P, C>,
    members: Vec<&mut crate::nn::common::Common>,
    group: &FuseGroup,
) {
    let trace = GroupTrace::new(group.member_paths());
    for (i, m) in members.into_iter().enumerate() {
        m.absorbed = Some(Placeholder {
            member: Member::new(trace.clone(), i + 1),
        });
        m.mark_fused();
    }
    head.trace = Some(Member::new(trace, 0));
    head.mark_fused();
}

#[derive(Clone, Copy)]
enum Fold {
    Conv,
    Linear,
    /// A transposed convolution (its groups are the head's).
    ConvTranspose,
}

fn absorb_bn(
    w: &mut Weighted,
    bn: &mut BatchNormInner,
    fold: Fold,
    group: &FuseGroup,
) -> Result<()> {
    check_float(w.common.stage(), "the head")?;
    check_float(bn.common.stage(), "the BatchNorm")?;
    let Some(core) = bn.core.take() else {
        return Err(Error::state(
            "BatchNorm without parameters",
            "report this as a bug",
        ));
    };
    if core.num_features() != w.out_channels()
        && !(core.num_features() == 1 && matches!(fold, Fold::Linear))
    {
        let n = core.num_features();
        bn.core = Some(core);
        return Err(Error::config(
            format!(
                "BatchNorm over {n} features follows a layer with {} output channels",
                w.out_channels()
            ),
            "fuse a BatchNorm whose num_features equals the layer's output channels",
        ));
    }
    match (group.mode, fold) {
        (FuseMode::Qat, Fold::ConvTranspose) => {
            bn.core = Some(core);
            return Err(Error::pass(
                "QAT fusion of ConvTranspose and BatchNorm (PyTorch has no QAT ConvTransposeBn \
                 module; its fuser raises 'not yet supported in QAT')",
                "fuse the group with fuse_modules (eval: the BatchNorm folds into the \
                 transposed convolution with its running statistics) before prepare_qat, or \
                 leave the pair unfused",
            ));
        }
        (FuseMode::Qat, _) => w.bn = Some(core),
        (FuseMode::Eval, _) => {
            let (rm, rv) = (core.running_mean.as_tensor(), core.running_var.as_tensor());
            let (eps, g, b) = (core.config.eps, &core.weight, &core.bias);
            let (nw, nb) = match fold {
                Fold::Conv => fold_conv_bn_weights(&w.weight, w.bias.as_ref(), rm, rv, eps, g, b),
                Fold::Linear => {
                    fold_linear_bn_weights(&w.weight, w.bias.as_ref(), rm, rv, eps, g, b)
                }
                Fold::ConvTranspose => fold_conv_transpose_bn_weights(
                    &w.weight,
                    w.bias.as_ref(),
                    rm,
                    rv,
                    eps,
                    g,
                    b,
                    w.transposed.ok_or_else(|| {
                        Error::state(
                            "a transposed fold of a direct layer",
                            "report this as a bug",
                        )
                    })?,
                ),
            }?;
            w.weight = nw;
            w.bias = Some(nb);
        }
    }
    Ok(())
}

macro_rules! weighted_bn {
    ($head:ty, $bn:ty, $fold:expr) => {
        impl<'a> FuseWith<&'a mut $bn> for $head {
            fn fuse_with(&mut self, bn: &'a mut $bn, group: &FuseGroup) -> Result<()> {
                let h = self;
                absorb_bn(&mut h.w, &mut bn.0, $fold, group).map_err(|e| group.error(e))?;
                link(&mut h.w.common, vec![&mut bn.0.common], group);
                Ok(())
            }
        }
    };
}

weighted_bn!(Conv1d, BatchNorm1d, Fold::Conv);
weighted_bn!(Conv2d, BatchNorm2d, Fold::Conv);
weighted_bn!(Conv3d, BatchNorm3d, Fold::Conv);
weighted_bn!(Linear, BatchNorm1d, Fold::Linear);
// PyTorch's `fuse_convtranspose_bn`: eval only, a plain folded ConvTranspose (correct for any
// groups, unlike PyTorch's fold: pytorch#180995).
weighted_bn!(ConvTranspose1d, BatchNorm1d, Fold::ConvTranspose);
weighted_bn!(ConvTranspose2d, BatchNorm2d, Fold::ConvTranspose);

/// (Conv, BatchNorm, ReLU): PyTorch's table has no (Linear, BatchNorm1d, ReLU).
macro_rules! conv_bn_relu {
    ($head:ty, $bn:ty) => {
        impl<'a> FuseWith<(&'a mut $bn, &'a mut ReLU)> for $head {
            fn fuse_with(
                &mut self,
                (bn, relu): (&'a mut $bn, &'a mut ReLU),
                group: &FuseGroup,
            ) -> Result<()> {
                let h = self;
                check_float(relu.common.stage(), "the ReLU").map_err(|e| group.error(e))?;
                absorb_bn(&mut h.w, &mut bn.0, Fold::Conv, group).map_err(|e| group.error(e))?;
                h.w.relu = true;
                link(
                    &mut h.w.common,
                    vec![&mut bn.0.common, &mut relu.common],
                    group,
                );
                Ok(())
            }
        }
    };
}

conv_bn_relu!(Conv1d, BatchNorm1d);
conv_bn_relu!(Conv2d, BatchNorm2d);
conv_bn_relu!(Conv3d, BatchNorm3d);

macro_rules! weighted_relu {
    ($($head:ty),*) => {$(
        impl<'a> FuseWith<&'a mut ReLU> for $head {
            fn fuse_with(&mut self, relu: &'a mut ReLU, group: &FuseGroup) -> Result<()> {
                let h = self;
                check_float(h.w.common.stage(), "the head").map_err(|e| group.error(e))?;
                check_float(relu.common.stage(), "the ReLU").map_err(|e| group.error(e))?;
                h.w.relu = true;
                link(&mut h.w.common, vec![&mut relu.common], group);
                Ok(())
            }
        }
    )*};
}

weighted_relu!(Conv1d, Conv2d, Conv3d, Linear);

macro_rules! bn_relu {
    ($($bn:ty),*) => {$(
        impl<'a> FuseWith<&'a mut ReLU> for $bn {
            fn fuse_with(&mut self, relu: &'a mut ReLU, group: &FuseGroup) -> Result<()> {
                let bn = self;
                check_float(bn.0.common.stage(), "the BatchNorm").map_err(|e| group.error(e))?;
                check_float(relu.common.stage(), "the ReLU").map_err(|e| group.error(e))?;
                bn.0.relu = true;
                link(&mut bn.0.common, vec![&mut relu.common], group);
                Ok(())
            }
        }
    )*};
}

bn_relu!(BatchNorm2d, BatchNorm3d);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Inference BatchNorm over dim 1.
    fn bn(y: &Tensor, rm: &Tensor, rv: &Tensor, eps: f64, g: &Tensor, b: &Tensor) -> Tensor {
        let shape = |t: &Tensor| {
            let mut s = vec![1usize; y.rank()];
            s[1] = t.elem_count();
            t.reshape(s).unwrap()
        };
        let n = y
            .broadcast_sub(&shape(rm))
            .unwrap()
            .broadcast_div(&shape(&(rv + eps).unwrap().sqrt().unwrap()))
            .unwrap();
        n.broadcast_mul(&shape(g))
            .unwrap()
            .broadcast_add(&shape(b))
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// A grouped 2-D transposed convolution, one candle call per group (candle's own takes
    /// no groups).
    fn conv_t2d(x: &Tensor, w: &Tensor, groups: usize, stride: usize) -> Tensor {
        let cin = x.dim(1).unwrap() / groups;
        let ys: Vec<Tensor> = (0..groups)
            .map(|g| {
                x.narrow(1, g * cin, cin)
                    .unwrap()
                    .conv_transpose2d(&w.narrow(0, g * cin, cin).unwrap(), 1, 1, stride, 1)
                    .unwrap()
            })
            .collect();
        Tensor::cat(&ys, 1).unwrap()
    }

    #[test]
    fn conv_transpose_bn_folds_for_any_groups() {
        let dev = Device::Cpu;
        for groups in [1usize, 2, 4] {
            let (cin, out) = (4usize, 8usize);
            let w = Tensor::randn(0f32, 1.0, (cin, out / groups, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
            let rm = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
            let rv = (Tensor::rand(0f32, 1.0, out, &dev).unwrap() + 0.5).unwrap();
            let gamma = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
            let beta = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, cin, 5, 6), &dev).unwrap();
            let y = conv_t2d(&x, &w, groups, 2)
                .broadcast_add(&b.reshape((1, out, 1, 1)).unwrap())
                .unwrap();
            let want = bn(&y, &rm, &rv, 1e-5, &gamma, &beta);
            let (wf, bf) =
                fold_conv_transpose_bn_weights(&w, Some(&b), &rm, &rv, 1e-5, &gamma, &beta, groups)
                    .unwrap();
            let got = conv_t2d(&x, &wf, groups, 2)
                .broadcast_add(&bf.reshape((1, out, 1, 1)).unwrap())
                .unwrap();
            assert!(max_diff(&got, &want) < 1e-4, "groups {groups}");

            // 1-D, through candle's grouped conv_transpose1d.
            let w1 = Tensor::randn(0f32, 1.0, (cin, out / groups, 3), &dev).unwrap();
            let x1 = Tensor::randn(0f32, 1.0, (2, cin, 7), &dev).unwrap();
            let y1 = x1.conv_transpose1d(&w1, 1, 0, 2, 1, groups).unwrap();
            let want1 = bn(&y1, &rm, &rv, 1e-5, &gamma, &beta);
            let (wf1, bf1) =
                fold_conv_transpose_bn_weights(&w1, None, &rm, &rv, 1e-5, &gamma, &beta, groups)
                    .unwrap();
            let got1 = x1
                .conv_transpose1d(&wf1, 1, 0, 2, 1, groups)
                .unwrap()
                .broadcast_add(&bf1.reshape((1, out, 1)).unwrap())
                .unwrap();
            assert!(max_diff(&got1, &want1) < 1e-4, "1-D, groups {groups}");
        }
        // PyTorch's reshape of the scale to (1, -1, 1, 1) would broadcast 8 scales against 4
        // columns when groups = 2; ours rejects shapes that do not fit instead.
        let w = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let c = Tensor::ones(8, candle_core::DType::F32, &dev).unwrap();
        assert!(fold_conv_transpose_bn_weights(&w, None, &c, &c, 0.0, &c, &c, 2).is_err());
    }
}
