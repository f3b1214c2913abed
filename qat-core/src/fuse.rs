//! Fusion: the type-level table of patterns ([`Fusable`], with [`FuseWith`] as the point
//! where a user's own layer types join it) and the BatchNorm folding math of PyTorch's
//! `torch.nn.utils.fusion`.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::{FuseMode, ModulePath, Stage};
use crate::nn::common::{GroupTrace, Member, Placeholder};
use crate::nn::weighted::Weighted;
use crate::nn::{
    BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormInner, Conv1d, Conv2d, Conv3d, Linear, ReLU,
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
            (Linear, BatchNorm1d); (Linear, ReLU); (BatchNorm2d|BatchNorm3d, ReLU)",
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
    match group.mode {
        FuseMode::Qat => w.bn = Some(core),
        FuseMode::Eval => {
            let f = match fold {
                Fold::Conv => fold_conv_bn_weights,
                Fold::Linear => fold_linear_bn_weights,
            };
            let (nw, nb) = f(
                &w.weight,
                w.bias.as_ref(),
                core.running_mean.as_tensor(),
                core.running_var.as_tensor(),
                core.config.eps,
                &core.weight,
                &core.bias,
            )?;
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
