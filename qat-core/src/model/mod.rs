//! The model side of the pipeline: module paths, the [`QuantModule`] interface every
//! quantizable layer implements, and the [`Quantizable`] trait that
//! `#[derive(Quantizable)]` writes for a user's model struct.

use crate::error::Result;
use crate::fake_quant::{FakeQuantize, FakeQuantizeState};
use crate::qconfig::QConfig;

pub(crate) mod hook;
pub(crate) mod params;
mod staged;
pub(crate) mod transaction;

pub use staged::Staged;

/// What [`QuantModule::for_each_intx_quantizer`] calls: `f(name, quantizer, weight)`.
pub type IntxVisitor<'a> = dyn FnMut(
        &str,
        &mut crate::fake_quant::IntxFakeQuantizer,
        Option<&candle_core::Tensor>,
    ) -> Result<()>
    + 'a;

/// A dotted module path as PyTorch writes it (`blocks.0.conv1`), built while walking a model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModulePath {
    segments: Vec<String>,
}

impl ModulePath {
    /// The root (empty) path.
    pub fn root() -> Self {
        Self::default()
    }

    /// Runs `f` with `name` appended to the path.
    pub fn scoped<R>(&mut self, name: impl ToString, f: impl FnOnce(&mut Self) -> R) -> R {
        self.segments.push(name.to_string());
        let r = f(self);
        self.segments.pop();
        r
    }

    /// The path joined by dots (empty at the root).
    pub fn dotted(&self) -> String {
        self.segments.join(".")
    }

    /// `child` under this path.
    pub fn join(&self, child: &str) -> String {
        if self.segments.is_empty() {
            child.to_string()
        } else {
            format!("{}.{child}", self.dotted())
        }
    }

    /// The path segments.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }
}

impl std::fmt::Display for ModulePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.segments.is_empty() {
            f.write_str("<root>")
        } else {
            f.write_str(&self.dotted())
        }
    }
}

/// Where a layer is in the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// As built.
    Float,
    /// Fused (or absorbed into a fused group as an identity placeholder).
    Fused,
    /// Fake-quantized for training.
    Prepared,
    /// Converted to integer kernels.
    Converted,
}

/// What the passes need from every quantizable layer.
pub trait QuantModule {
    /// What the layer is now, as PyTorch would name the module (`Conv2d`, `ConvBnReLU2d`,
    /// `Identity` for an absorbed placeholder, ...).
    fn kind(&self) -> String;
    /// The Rust type's name, used for qconfig mapping by type (`Conv2d`, `Linear`, ...).
    fn type_name(&self) -> &'static str;
    /// Pipeline stage.
    fn stage(&self) -> Stage;
    /// Model-wide train/eval.
    fn set_training(&mut self, training: bool);
    /// Attaches fake-quants for `qconfig` (`None`: stay float).
    fn prepare_qat(&mut self, qconfig: Option<&QConfig>) -> Result<()>;
    /// The qconfig the layer was prepared with.
    fn qconfig(&self) -> Option<&QConfig>;
    /// Calls `f(role, fake_quant)` for each fake-quant the layer owns (`weight`,
    /// `activation`).
    fn for_each_fake_quant(&mut self, f: &mut dyn FnMut(&str, &mut FakeQuantize));
    /// Reads each fake-quant the layer owns.
    fn fake_quants(&self) -> Vec<(String, FakeQuantize)>;
    /// Whether `convert` can give the layer an integer form when it is prepared with a
    /// qconfig (`prepare_qat` refuses a qconfig on a layer without one, e.g. Conv3d).
    fn has_int8_form(&self) -> bool {
        true
    }
    /// How the layer takes a torchao or GGML [`crate::qconfig::Scheme`] (default: it
    /// refuses them, and prepare names it).
    fn scheme_support(&self) -> crate::qconfig::SchemeSupport {
        crate::qconfig::SchemeSupport::Refused
    }
    /// Calls `f(name, quantizer, weight)` for each torchao intx quantizer the layer owns,
    /// named as torchao names them (`weight_fake_quantizer`, `activation_fake_quantizer`);
    /// `weight` is the tensor a weight quantizer sees (`None` for an input quantizer).
    fn for_each_intx_quantizer(&mut self, _f: &mut IntxVisitor<'_>) -> Result<()> {
        Ok(())
    }
    /// Whether `convert` gave the layer candle's GGML runtime (`QMatMul`) rather than an
    /// int8 kernel: such a model deploys as GGUF, not through `save_int8` or ONNX.
    fn ggml_converted(&self) -> bool {
        false
    }
    /// What `prepare_qat(qconfig)` would refuse in the layer's own shapes (a group size that
    /// does not divide in_features, ...), found without changing anything.
    fn check_qconfig(&self, _qconfig: &QConfig) -> Result<()> {
        Ok(())
    }
    /// Computes what [`QuantModule::convert`] would make of the layer, changing nothing: the
    /// int8 weights and the input and output qparams of a prepared layer, checked (the
    /// fake-quants saw data, the inputs have a known producer, an int8 kernel exists), or
    /// [`Staged::unchanged`] for a layer that stays float. The first phase of the
    /// transactional [`crate::passes::convert`].
    fn stage_convert(&self) -> Result<Staged>;
    /// Checks a saved converted state ([`QuantModule::int8_state`]) against the layer and
    /// stages it, changing nothing (the model must be fused as when it was saved).
    fn stage_int8_state(&self, _state: crate::record::Int8State) -> Result<Staged> {
        Err(crate::error::Error::state(
            format!("{} has no int8 form", self.kind()),
            "load int8 checkpoints into models of the same structure",
        ))
    }
    /// Applies a change this layer staged ([`QuantModule::stage_convert`],
    /// [`QuantModule::stage_int8_state`]). It fails only when given a change staged by a layer
    /// of another type, and then changes nothing.
    fn apply_staged(&mut self, change: Staged) -> Result<()>;
    /// Switches a prepared layer to integer arithmetic with the qparams its fake-quants hold
    /// and the input qparams noted by the last prepared forward; float layers stay float. An
    /// error leaves the layer as it was.
    fn convert(&mut self) -> Result<()> {
        let change = self.stage_convert()?;
        self.apply_staged(change)
    }
    /// What a converted layer needs to run, to save (`None` unless converted).
    fn int8_state(&self) -> Option<crate::record::Int8State> {
        None
    }
    /// Restores a converted layer saved with [`QuantModule::int8_state`] (the model must be
    /// fused as when it was saved). An error leaves the layer as it was.
    fn load_int8_state(&mut self, state: crate::record::Int8State) -> Result<()> {
        let change = self.stage_int8_state(state)?;
        self.apply_staged(change)
    }
    /// Checks saved fake-quant states, one per role the layer has (`weight`, `activation`),
    /// against its fake-quants, changing nothing.
    fn check_fake_quant_states(&self, states: &[(String, FakeQuantizeState)]) -> Result<()> {
        let own = self.fake_quants();
        for (role, _) in states {
            if !own.iter().any(|(r, _)| r == role) {
                return Err(crate::error::Error::state(
                    format!("{} has no `{role}` fake-quant", self.kind()),
                    "load a checkpoint saved from a model fused and prepared the same way",
                ));
            }
        }
        for (role, fq) in &own {
            let state = states.iter().find(|(r, _)| r == role).ok_or_else(|| {
                crate::error::Error::state(
                    format!(
                        "no saved state for the `{role}` fake-quant of {}",
                        self.kind()
                    ),
                    "load a checkpoint saved from a model fused and prepared the same way",
                )
            })?;
            let name = if role == "weight" {
                "weight_fake_quant"
            } else {
                "activation_post_process"
            };
            fq.check_state(&state.1).map_err(|e| e.in_module(name))?;
        }
        Ok(())
    }
    /// Restores saved fake-quant states ([`QuantModule::check_fake_quant_states`] first: an
    /// error leaves the layer as it was).
    fn load_fake_quant_states(&mut self, states: &[(String, FakeQuantizeState)]) -> Result<()> {
        self.check_fake_quant_states(states)?;
        let mut result = Ok(());
        self.for_each_fake_quant(&mut |role, fq| {
            if let Some((_, s)) = states.iter().find(|(r, _)| r == role) {
                // Checked above; a failure here would leave this one fake-quant unchanged.
                if let Err(e) = fq.load_state(s) {
                    result = Err(e);
                }
            }
        });
        result
    }
    /// The float tensors the layer's forward reads besides its int8 state, by name under the
    /// layer (PyTorch's: `weight`, `bias`, `bn.running_mean`, ...): a float layer's
    /// parameters and BatchNorm statistics, a converted BatchNorm's; none for a converted
    /// conv or linear layer (its int8 state holds them) or a layer without parameters.
    /// [`crate::checkpoint::save_int8`] stores them.
    fn float_params(&self) -> Vec<(&'static str, candle_core::Tensor)> {
        Vec::new()
    }
    /// Replaces the tensors [`QuantModule::float_params`] lists with `params` (the same
    /// names and shapes, converted to the layer's dtype and device); anything else is an
    /// error and leaves the layer as it was.
    fn load_float_params(&mut self, params: Vec<(String, candle_core::Tensor)>) -> Result<()> {
        params::check_float_params(&self.float_params(), &params)
    }
    /// Identities of the layer's output fake-quant and of the fake-quants its inputs came
    /// from (as noted by the last prepared forward), so that a checkpoint can record which
    /// layer produced each input.
    #[doc(hidden)]
    fn producer_keys(&self) -> (Option<usize>, Vec<Option<usize>>) {
        (None, Vec::new())
    }
    /// Remembers the layer's module path so that its forward errors name it; the passes call
    /// it as they walk the model.
    #[doc(hidden)]
    fn set_path(&mut self, _path: &ModulePath) {}
    /// Freezes (`true`) or unfreezes the statistics of a live BatchNorm inside the layer.
    fn set_bn_frozen(&mut self, _frozen: bool) {}
    /// Identifies the layer in the ONNX exporter's trace (the address of its state); layers
    /// that return `None` cannot be exported.
    #[doc(hidden)]
    fn trace_key(&self) -> Option<usize> {
        None
    }
}

/// A read-only walk over a model.
pub trait ModuleVisitor {
    /// Called for every leaf layer.
    fn layer(&mut self, path: &ModulePath, module: &dyn QuantModule) -> Result<()>;
    /// Called before a nested model's fields are walked.
    fn enter(&mut self, _path: &ModulePath, _type_name: &'static str) -> Result<()> {
        Ok(())
    }
}

/// A mutating walk over a model.
pub trait ModuleVisitorMut {
    /// Called for every leaf layer.
    fn layer(&mut self, path: &ModulePath, module: &mut dyn QuantModule) -> Result<()>;
    /// Called before a nested model's fields are walked.
    fn enter(&mut self, _path: &ModulePath, _type_name: &'static str) -> Result<()> {
        Ok(())
    }
    /// Called after a nested model's fields were walked.
    fn leave(&mut self, _path: &ModulePath) -> Result<()> {
        Ok(())
    }
}

/// How fusion treats BatchNorm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuseMode {
    /// Fold BN into the weights with its running statistics (inference, PTQ).
    Eval,
    /// Keep BN live inside the fused module (quantization-aware training).
    Qat,
}

/// A model (or part of one) the passes can walk. Written by `#[derive(Quantizable)]`;
/// implemented by every layer of [`crate::nn`] and by `Vec`, `Option`, arrays and `Box` of
/// quantizable things.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not quantizable",
    label = "this field holds no candle-qat layers the passes can walk",
    note = "fields of a #[derive(Quantizable)] struct must be candle-qat layers, structs that \
            derive Quantizable, or Vec/Option/array/Box of those",
    note = "mark fields that hold no layers (dropout rates, plain candle modules, ...) with \
            #[qat(skip)]"
)]
pub trait Quantizable {
    /// Walks the model read-only, with module paths.
    fn visit(&self, path: &mut ModulePath, v: &mut dyn ModuleVisitor) -> Result<()>;
    /// Walks the model mutably, with module paths.
    fn visit_mut(&mut self, path: &mut ModulePath, v: &mut dyn ModuleVisitorMut) -> Result<()>;
    /// Fuses this model's declared groups, then its children's.
    fn fuse(&mut self, _path: &mut ModulePath, _mode: FuseMode) -> Result<()> {
        Ok(())
    }
    /// The fusion groups this model declares (field names), for summaries.
    fn fusion_groups(&self) -> Vec<Vec<&'static str>> {
        Vec::new()
    }
}

impl<T: Quantizable> Quantizable for Vec<T> {
    fn visit(&self, path: &mut ModulePath, v: &mut dyn ModuleVisitor) -> Result<()> {
        self.iter()
            .enumerate()
            .try_for_each(|(i, m)| path.scoped(i, |p| m.visit(p, v)))
    }
    fn visit_mut(&mut self, path: &mut ModulePath, v: &mut dyn ModuleVisitorMut) -> Result<()> {
        self.iter_mut()
            .enumerate()
            .try_for_each(|(i, m)| path.scoped(i, |p| m.visit_mut(p, v)))
    }
    fn fuse(&mut self, path: &mut ModulePath, mode: FuseMode) -> Result<()> {
        self.iter_mut()
            .enumerate()
            .try_for_each(|(i, m)| path.scoped(i, |p| m.fuse(p, mode)))
    }
}

impl<T: Quantizable, const N: usize> Quantizable for [T; N] {
    fn visit(&self, path: &mut ModulePath, v: &mut dyn ModuleVisitor) -> Result<()> {
        self.iter()
            .enumerate()
            .try_for_each(|(i, m)| path.scoped(i, |p| m.visit(p, v)))
    }
    fn visit_mut(&mut self, path: &mut ModulePath, v: &mut dyn ModuleVisitorMut) -> Result<()> {
        self.iter_mut()
            .enumerate()
            .try_for_each(|(i, m)| path.scoped(i, |p| m.visit_mut(p, v)))
    }
    fn fuse(&mut self, path: &mut ModulePath, mode: FuseMode) -> Result<()> {
        self.iter_mut()
            .enumerate()
            .try_for_each(|(i, m)| path.scoped(i, |p| m.fuse(p, mode)))
    }
}

impl<T: Quantizable> Quantizable for Option<T> {
    fn visit(&self, path: &mut ModulePath, v: &mut dyn ModuleVisitor) -> Result<()> {
        self.as_ref().map_or(Ok(()), |m| m.visit(path, v))
    }
    fn visit_mut(&mut self, path: &mut ModulePath, v: &mut dyn ModuleVisitorMut) -> Result<()> {
        self.as_mut().map_or(Ok(()), |m| m.visit_mut(path, v))
    }
    fn fuse(&mut self, path: &mut ModulePath, mode: FuseMode) -> Result<()> {
        self.as_mut().map_or(Ok(()), |m| m.fuse(path, mode))
    }
}

impl<T: Quantizable> Quantizable for Box<T> {
    fn visit(&self, path: &mut ModulePath, v: &mut dyn ModuleVisitor) -> Result<()> {
        (**self).visit(path, v)
    }
    fn visit_mut(&mut self, path: &mut ModulePath, v: &mut dyn ModuleVisitorMut) -> Result<()> {
        (**self).visit_mut(path, v)
    }
    fn fuse(&mut self, path: &mut ModulePath, mode: FuseMode) -> Result<()> {
        (**self).fuse(path, mode)
    }
    fn fusion_groups(&self) -> Vec<Vec<&'static str>> {
        (**self).fusion_groups()
    }
}

/// Implements [`Quantizable`] for a leaf layer type that implements [`QuantModule`].
macro_rules! leaf_quantizable {
    ($($t:ty),* $(,)?) => {$(
        impl $crate::model::Quantizable for $t {
            fn visit(
                &self,
                path: &mut $crate::model::ModulePath,
                v: &mut dyn $crate::model::ModuleVisitor,
            ) -> $crate::error::Result<()> {
                v.layer(path, self)
            }
            fn visit_mut(
                &mut self,
                path: &mut $crate::model::ModulePath,
                v: &mut dyn $crate::model::ModuleVisitorMut,
            ) -> $crate::error::Result<()> {
                v.layer(path, self)
            }
        }
    )*};
}
pub(crate) use leaf_quantizable;
