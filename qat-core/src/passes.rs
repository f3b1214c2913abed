//! Model-wide passes over any [`Quantizable`] model: fuse, prepare_qat, train/eval, BN-stat
//! freezing, observer and fake-quant toggles, learnable (LSQ) fake-quants and their
//! parameters, and the module listing and summary.

use candle_core::Var;

use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantize;
use crate::model::transaction::{self, transact};
use crate::model::{
    FuseMode, ModulePath, ModuleVisitor, ModuleVisitorMut, QuantModule, Quantizable, Stage,
};
use crate::qconfig::{LearnableSpec, QConfig, Scheme, SchemeSupport};
use crate::qconfig_mapping::QConfigMapping;
use crate::qparams::QParams;

/// Fuses every declared group with BN folded into the weights (inference, PTQ): PyTorch's
/// `fuse_modules` on a model in eval mode.
pub fn fuse_modules<M: Quantizable>(model: &mut M) -> Result<()> {
    model.fuse(&mut ModulePath::root(), FuseMode::Eval)
}

/// Fuses every declared group for QAT, BN kept live: PyTorch's `fuse_modules_qat`.
pub fn fuse_modules_qat<M: Quantizable>(model: &mut M) -> Result<()> {
    model.fuse(&mut ModulePath::root(), FuseMode::Qat)
}

struct ForEachRef<F>(F);

impl<F: FnMut(&ModulePath, &dyn QuantModule) -> Result<()>> ModuleVisitor for ForEachRef<F> {
    fn layer(&mut self, path: &ModulePath, module: &dyn QuantModule) -> Result<()> {
        (self.0)(path, module).map_err(|e| transaction::at(path, e))
    }
}

struct ForEach<F>(F);

impl<F: FnMut(&ModulePath, &mut dyn QuantModule) -> Result<()>> ModuleVisitorMut for ForEach<F> {
    fn layer(&mut self, path: &ModulePath, module: &mut dyn QuantModule) -> Result<()> {
        module.set_path(path);
        (self.0)(path, module).map_err(|e| match e {
            e @ Error::InModule { .. } => e,
            e => e.in_module(path.dotted()),
        })
    }
}

/// Runs `f` on every layer of the model with its path.
pub fn for_each_layer<M: Quantizable>(
    model: &mut M,
    f: impl FnMut(&ModulePath, &mut dyn QuantModule) -> Result<()>,
) -> Result<()> {
    model.visit_mut(&mut ModulePath::root(), &mut ForEach(f))
}

fn for_each_fq<M: Quantizable>(
    model: &mut M,
    mut f: impl FnMut(&str, &mut FakeQuantize),
) -> Result<()> {
    for_each_layer(model, |_, m| {
        m.for_each_fake_quant(&mut |role, fq| f(role, fq));
        Ok(())
    })
}

struct Prepare<'a> {
    mapping: &'a QConfigMapping,
    stack: Vec<Option<QConfig>>,
    seen_paths: Vec<String>,
    /// Prepare the layers (`false`: only check that every layer can be prepared).
    apply: bool,
}

impl Prepare<'_> {
    fn parent(&self) -> Option<QConfig> {
        self.stack
            .last()
            .copied()
            .unwrap_or(self.mapping.global_qconfig().copied())
    }

    /// The qconfig a layer takes from the one the mapping resolved: under a torchao / GGML
    /// scheme, layers without weights stay float, an Embedding takes only weight-only
    /// schemes, and layers that cannot take one are an error (see `qconfig::Scheme`).
    fn for_layer(module: &dyn QuantModule, qc: Option<QConfig>) -> Result<Option<QConfig>> {
        let Some(qc) = qc else {
            return Ok(None);
        };
        if matches!(qc.scheme, Scheme::Eager) {
            return Ok(Some(qc));
        }
        match module.scheme_support() {
            SchemeSupport::InputAndWeight => Ok(Some(qc)),
            SchemeSupport::WeightOnly if !qc.scheme.quantizes_inputs() => Ok(Some(qc)),
            SchemeSupport::WeightOnly | SchemeSupport::Float => Ok(None),
            SchemeSupport::Refused => Err(Error::config(
                format!(
                    "{} ({}) cannot take the transformer scheme `{}` (torchao / GGML schemes                      quantize Linear inputs and Linear / Embedding weights)",
                    module.kind(),
                    module.type_name(),
                    qc.scheme.describe()
                ),
                format!(
                    "give it an eager qconfig (QConfig::default_qat) or None by type or path,                      e.g. `.set_type::<{}>(None)`",
                    module.type_name()
                ),
            )),
        }
    }

    /// What `prepare_qat(qc)` on `module` would refuse, found without changing anything.
    fn check(module: &dyn QuantModule, qc: Option<&QConfig>) -> Result<()> {
        match module.stage() {
            Stage::Float | Stage::Fused => {}
            Stage::Prepared => {
                return Err(Error::pass(
                    "prepare_qat was already run on this layer",
                    "prepare a model once; load a checkpoint to start over",
                ))
            }
            Stage::Converted => {
                return Err(Error::pass(
                    "the layer is already converted",
                    "prepare_qat a float model, then convert",
                ))
            }
        }
        let Some(qc) = qc else {
            return Ok(());
        };
        if !matches!(qc.scheme, Scheme::Eager) {
            return module.check_qconfig(qc);
        }
        if !module.has_int8_form() {
            return Err(Error::config(
                format!(
                    "{} ({}) has no int8 form, so a model prepared with a qconfig on it could \
                     not be converted",
                    module.kind(),
                    module.type_name()
                ),
                format!(
                    "keep it float: map its path or its type to None (e.g. \
                     `.set_type::<{}>(None)` or `.set_path(\"<its path>\", None)` on the \
                     QConfigMapping)",
                    module.type_name()
                ),
            ));
        }
        // The specs build as prepare will build them (a per-channel learnable spec needs a
        // channel count; any count checks the spec).
        FakeQuantize::with_channels(&qc.activation, 1)?;
        FakeQuantize::with_channels(&qc.weight, 1)?;
        Ok(())
    }
}

impl ModuleVisitorMut for Prepare<'_> {
    fn enter(&mut self, path: &ModulePath, type_name: &'static str) -> Result<()> {
        let parent = self.parent();
        let qc = if path.segments().is_empty() {
            self.mapping
                .resolve("", type_name, self.mapping.global_qconfig())
        } else {
            self.seen_paths.push(path.dotted());
            self.mapping
                .resolve(&path.dotted(), type_name, parent.as_ref())
        };
        self.stack.push(qc);
        Ok(())
    }

    fn leave(&mut self, _path: &ModulePath) -> Result<()> {
        self.stack.pop();
        Ok(())
    }

    fn layer(&mut self, path: &ModulePath, module: &mut dyn QuantModule) -> Result<()> {
        let dotted = path.dotted();
        let qc = self
            .mapping
            .resolve(&dotted, module.type_name(), self.parent().as_ref());
        self.seen_paths.push(dotted.clone());
        let qc = Self::for_layer(&*module, qc).map_err(|e| e.in_module(dotted.clone()))?;
        if !self.apply {
            return Self::check(module, qc.as_ref()).map_err(|e| e.in_module(dotted));
        }
        module.set_path(path);
        module
            .prepare_qat(qc.as_ref())
            .map_err(|e| e.in_module(dotted))
    }
}

/// Gives every layer the fake-quants its qconfig asks for (weights of conv/linear, outputs of
/// weighted layers, fused groups, QuantStub, FloatFunctional, BatchNorm; fixed qparams for
/// sigmoid and tanh; none for DeQuantStub, a lone ReLU, max pool and flatten): PyTorch's
/// `prepare_qat`.
///
/// Everything is checked before any layer changes, so an error leaves the model as it was
/// and `prepare_qat` can run again after the fix: a path in the mapping that names no
/// module, a layer already prepared or converted, a qconfig that cannot be built, and a
/// qconfig on a layer that has no int8 form (Conv3d: map it to `None`) are errors naming
/// the layer.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::VarBuilder;
/// use qat_core::nn::{Conv3d, ConvConfig};
/// use qat_core::passes::prepare_qat;
/// use qat_core::qconfig::{Backend, QConfig};
/// use qat_core::qconfig_mapping::QConfigMapping;
/// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
/// let mut conv = Conv3d::new(2, 4, 3, ConvConfig::default(), true, vb)?;
/// let int8 = QConfigMapping::global(QConfig::default_qat(Backend::X86));
/// let e = prepare_qat(&mut conv, &int8).unwrap_err().to_string();
/// assert!(e.contains("has no int8 form"), "{e}");
/// prepare_qat(&mut conv, &int8.set_type::<Conv3d>(None))?; // stays float
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn prepare_qat<M: Quantizable>(model: &mut M, mapping: &QConfigMapping) -> Result<()> {
    let mut v = Prepare {
        mapping,
        stack: Vec::new(),
        seen_paths: Vec::new(),
        apply: false,
    };
    model.visit_mut(&mut ModulePath::root(), &mut v)?;
    for p in mapping.paths() {
        if !v.seen_paths.iter().any(|s| s == p) {
            return Err(Error::config(
                format!(
                    "the qconfig mapping names module path `{p}`, which the model does not have"
                ),
                "use a dotted path from named_modules() (e.g. `blocks.0.conv1`)",
            ));
        }
    }
    let mut v = Prepare {
        mapping,
        stack: Vec::new(),
        seen_paths: Vec::new(),
        apply: true,
    };
    model.visit_mut(&mut ModulePath::root(), &mut v)
}

/// Converts a prepared model to integer arithmetic in place: int8 weights (BN folded),
/// u8 activations between layers, each clamped to the range its fake-quant trained with, so
/// the converted model agrees with the fake-quant model code for code. Run calibration data
/// through the prepared model first: it sets the activation fake-quants' qparams and notes
/// which fake-quant feeds each layer. Layers with a `None` qconfig stay float. The model is
/// left in eval mode.
///
/// Every layer is checked before any changes (an int8 kernel exists, every fake-quant saw
/// data, every input has a known producer): an error leaves the model exactly as it was, and
/// convert can be run again after the fix its message names.
pub fn convert<M: Quantizable>(model: &mut M) -> Result<()> {
    let mut prepared = 0;
    let mut converted = 0;
    model.visit(
        &mut ModulePath::root(),
        &mut ForEachRef(|_: &ModulePath, m: &dyn QuantModule| {
            match m.stage() {
                Stage::Prepared => prepared += 1,
                Stage::Converted => converted += 1,
                _ => {}
            }
            Ok(())
        }),
    )?;
    if converted > 0 {
        return Err(Error::pass(
            "the model is already converted",
            "convert a prepared model once (reload the QAT checkpoint to convert again)",
        ));
    }
    if prepared == 0 {
        return Err(Error::pass(
            "convert found no prepared layer",
            "run prepare_qat (and at least one forward) before convert",
        ));
    }
    transact(
        model,
        |_, m| m.stage_convert(),
        |m, change| {
            m.set_training(false);
            m.apply_staged(change)
        },
    )
}

/// Training mode everywhere (BN uses batch statistics unless frozen): `model.train()`.
pub fn train<M: Quantizable>(model: &mut M) -> Result<()> {
    for_each_layer(model, |_, m| {
        m.set_training(true);
        Ok(())
    })
}

/// Eval mode everywhere (BN uses running statistics): `model.eval()`.
pub fn eval<M: Quantizable>(model: &mut M) -> Result<()> {
    for_each_layer(model, |_, m| {
        m.set_training(false);
        Ok(())
    })
}

/// Stops BN statistics updates in fused conv/linear+BN modules (they then normalise with
/// running statistics, also in training); `train` does not undo it.
pub fn freeze_bn_stats<M: Quantizable>(model: &mut M) -> Result<()> {
    for_each_layer(model, |_, m| {
        m.set_bn_frozen(true);
        Ok(())
    })
}

/// Resumes BN statistics updates in fused modules.
pub fn update_bn_stats<M: Quantizable>(model: &mut M) -> Result<()> {
    for_each_layer(model, |_, m| {
        m.set_bn_frozen(false);
        Ok(())
    })
}

/// Turns every observer on.
pub fn enable_observer<M: Quantizable>(model: &mut M) -> Result<()> {
    for_each_fq(model, |_, fq| fq.enable_observer())
}

/// Freezes every observer (qparams stop moving).
pub fn disable_observer<M: Quantizable>(model: &mut M) -> Result<()> {
    for_each_fq(model, |_, fq| fq.disable_observer())
}

/// Turns fake quantization on everywhere.
pub fn enable_fake_quant<M: Quantizable>(model: &mut M) -> Result<()> {
    for_each_fq(model, |_, fq| fq.enable_fake_quant())
}

/// Turns fake quantization off everywhere (the model computes in float).
pub fn disable_fake_quant<M: Quantizable>(model: &mut M) -> Result<()> {
    for_each_fq(model, |_, fq| fq.disable_fake_quant())
}

/// The PyTorch name of the fake-quant of `role` (`weight`, `activation`) of the layer at
/// `path`: `conv1.weight_fake_quant`, `conv1.activation_post_process`.
pub(crate) fn fake_quant_path(path: &ModulePath, role: &str) -> String {
    path.join(fake_quant_name(role))
}

/// The module name of a layer's fake-quant of `role` under the layer: `weight_fake_quant`,
/// `activation_post_process`.
pub(crate) fn fake_quant_name(role: &str) -> &'static str {
    if role == "weight" {
        "weight_fake_quant"
    } else {
        "activation_post_process"
    }
}

/// Whether a fake-quant's qparams are fixed by design (sigmoid and tanh outputs): those stay
/// as they are, as in PyTorch.
fn fixed_qparams(fq: &FakeQuantize) -> bool {
    fq.observer().name() == "FixedQParamsObserver"
}

/// Makes every fake-quant of a prepared model learnable (LSQ, PyTorch's
/// `_LearnableFakeQuantize`), except the fixed-qparams ones of sigmoid and tanh. Each keeps
/// the qparams its observer found so far and starts in static estimation; call
/// [`enable_param_learning`] to train them, and hand [`learnable_parameters`] to the
/// optimizer. Run a calibration forward first: a per-channel (weight) fake-quant must have
/// seen its tensor to know its channel count. A converted model is refused. On error, nothing
/// was changed.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use qat_core::nn::{Linear, QuantStub};
/// use qat_core::passes::{enable_param_learning, learnable_parameters, make_learnable, prepare_qat};
/// use qat_core::qconfig::{Backend, LearnableSpec, QConfig};
/// use qat_core::qconfig_mapping::QConfigMapping;
/// let varmap = VarMap::new();
/// let mut fc = Linear::new(4, 2, true, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
/// prepare_qat(&mut fc, &QConfigMapping::global(QConfig::default_qat(Backend::X86)))?;
/// fc.forward(&Tensor::ones((3, 4), DType::F32, &Device::Cpu)?)?; // calibrate
/// make_learnable(&mut fc, LearnableSpec::default())?;
/// enable_param_learning(&mut fc)?;
/// let lsq = learnable_parameters(&mut fc)?;
/// assert_eq!(lsq[0].0, "weight_fake_quant.scale");
/// let mut vars = varmap.all_vars();
/// vars.extend(lsq.into_iter().map(|(_, v)| v)); // one optimizer over both
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn make_learnable<M: Quantizable>(model: &mut M, spec: LearnableSpec) -> Result<()> {
    // Validate on copies first, so that an error leaves the model unchanged.
    let mut count = 0usize;
    for_each_layer(model, |path, m| {
        if m.stage() == Stage::Converted {
            // Its fake-quants only document how it was trained: they never run again.
            return Err(Error::pass(
                format!("make_learnable on a converted {}", m.kind()),
                "make the fake-quants learnable on the prepared model, before convert",
            )
            .in_module(path.dotted()));
        }
        let mut first_err = None;
        m.for_each_fake_quant(&mut |role, fq| {
            if first_err.is_some() || fixed_qparams(fq) {
                return;
            }
            count += 1;
            if let Err(e) = fq.clone().make_learnable(spec) {
                first_err = Some(e.in_module(fake_quant_path(path, role)));
            }
        });
        first_err.map_or(Ok(()), Err)
    })?;
    if count == 0 {
        return Err(Error::pass(
            "make_learnable found no fake-quant to make learnable",
            "run prepare_qat (and a calibration forward) before make_learnable",
        ));
    }
    for_each_layer(model, |path, m| {
        let mut first_err = None;
        m.for_each_fake_quant(&mut |role, fq| {
            if first_err.is_none() && !fixed_qparams(fq) {
                first_err = fq
                    .make_learnable(spec)
                    .err()
                    .map(|e| e.in_module(fake_quant_path(path, role)));
            }
        });
        first_err.map_or(Ok(()), Err)
    })
}

/// LSQ: every learnable fake-quant learns its scale and zero point by gradient (observer off,
/// fake quantization on): PyTorch's `model.apply(enable_param_learning)`. Others are
/// unchanged.
pub fn enable_param_learning<M: Quantizable>(model: &mut M) -> Result<()> {
    for_each_fq(model, |_, fq| fq.enable_param_learning())
}

/// LSQ: every learnable fake-quant takes its qparams from its observer again, without
/// gradients: PyTorch's `enable_static_estimate`. Others are unchanged.
pub fn enable_static_estimate<M: Quantizable>(model: &mut M) -> Result<()> {
    for_each_fq(model, |_, fq| fq.enable_static_estimate())
}

/// The scale and zero point `Var`s of every learnable fake-quant, with PyTorch's names
/// (`conv1.weight_fake_quant.scale`, `conv1.activation_post_process.zero_point`), to give the
/// optimizer beside the model's own parameters (see [`make_learnable`]). Empty when no
/// fake-quant is learnable. Takes the model mutably because it reaches the fake-quants the
/// forward uses, not copies of them.
pub fn learnable_parameters<M: Quantizable>(model: &mut M) -> Result<Vec<(String, Var)>> {
    let mut out = Vec::new();
    for_each_layer(model, |path, m| {
        m.for_each_fake_quant(&mut |role, fq| {
            let prefix = fake_quant_path(path, role);
            let vars = fq.learnable_vars();
            for (name, v) in ["scale", "zero_point"].into_iter().zip(vars) {
                out.push((format!("{prefix}.{name}"), v));
            }
        });
        m.for_each_intx_quantizer(&mut |role, q, _| {
            let prefix = path.join(role);
            for (name, v) in ["scale", "zero_point"].into_iter().zip(q.vars()) {
                out.push((format!("{prefix}.{name}"), v));
            }
            Ok(())
        })
    })?;
    Ok(out)
}

/// torchao's `initialize_fake_quantizers`: gives every range-learning intx weight quantizer
/// (`IntxSpec::builder(..).dynamic(false).range_learning(true)`) its trainable scale and
/// zero point, computed from the layer's current weight, so that [`learnable_parameters`]
/// returns them for the optimizer. Call it after [`prepare_qat`] and before building the
/// optimizer. Static (non-dynamic) quantizers are left to take their qparams from their first
/// forward, as torchao's; dynamic ones have nothing to initialise. An error (a quantizer that
/// cannot take its weight's shape) leaves every quantizer as it was.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use qat_core::fake_quant::IntxSpec;
/// use qat_core::nn::Linear;
/// use qat_core::passes::{initialize_fake_quantizers, learnable_parameters, prepare_qat};
/// use qat_core::qconfig::QConfig;
/// use qat_core::qconfig_mapping::QConfigMapping;
/// let vm = VarMap::new();
/// let mut fc = Linear::new(64, 8, false, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let w4 = IntxSpec::builder(4).per_group(32).dynamic(false).range_learning(true).build()?;
/// prepare_qat(&mut fc, &QConfigMapping::global(QConfig::intx(None, w4)))?;
/// initialize_fake_quantizers(&mut fc)?;
/// let names: Vec<String> = learnable_parameters(&mut fc)?.into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["weight_fake_quantizer.scale"]); // symmetric: no zero point
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn initialize_fake_quantizers<M: Quantizable>(model: &mut M) -> Result<()> {
    // Computed first, applied after: an error changes nothing.
    let mut staged = Vec::new();
    for_each_layer(model, |path, m| {
        m.for_each_intx_quantizer(&mut |role, q, weight| {
            if let (true, Some(w)) = (q.spec().range_learning(), weight) {
                let mut fresh = q.clone();
                fresh
                    .initialize(w)
                    .map_err(|e| e.in_module(path.join(role)))?;
                staged.push(fresh);
            }
            Ok(())
        })
    })?;
    let mut staged = staged.into_iter();
    for_each_layer(model, |_, m| {
        m.for_each_intx_quantizer(&mut |_, q, weight| {
            if let (true, Some(_)) = (q.spec().range_learning(), weight) {
                if let Some(fresh) = staged.next() {
                    *q = fresh;
                }
            }
            Ok(())
        })
    })
}

/// One fake-quant of a module, as listed by [`named_modules`].
#[derive(Clone, Debug)]
pub struct FakeQuantInfo {
    /// `weight` or `activation`.
    pub role: String,
    /// Current qparams.
    pub qparams: QParams,
    /// Effective code range.
    pub quant_range: (i32, i32),
    /// The observer's kind.
    pub observer: &'static str,
    /// Whether the observer runs.
    pub observer_enabled: bool,
    /// Whether fake quantization runs.
    pub fake_quant_enabled: bool,
    /// Whether scale and zero point are learnable (LSQ, see [`make_learnable`]).
    pub learnable: bool,
    /// Whether they receive gradients now (see [`enable_param_learning`]).
    pub learning_enabled: bool,
}

/// One layer of a model, as listed by [`named_modules`].
#[derive(Clone, Debug)]
pub struct ModuleInfo {
    /// Dotted path (`blocks.0.conv1`).
    pub path: String,
    /// What the module is now (`ConvBnReLU2d`, `Identity`, ...).
    pub kind: String,
    /// The Rust type's name.
    pub type_name: &'static str,
    /// Pipeline stage.
    pub stage: Stage,
    /// The qconfig it was prepared with.
    pub qconfig: Option<QConfig>,
    /// Its fake-quants.
    pub fake_quants: Vec<FakeQuantInfo>,
}

struct Collect(Vec<ModuleInfo>);

impl ModuleVisitor for Collect {
    fn layer(&mut self, path: &ModulePath, m: &dyn QuantModule) -> Result<()> {
        let fake_quants = m
            .fake_quants()
            .into_iter()
            .map(|(role, fq)| FakeQuantInfo {
                role,
                qparams: fq.qparams(),
                quant_range: (fq.quant_range().quant_min(), fq.quant_range().quant_max()),
                observer: fq.observer().name(),
                observer_enabled: fq.observer_enabled(),
                fake_quant_enabled: fq.fake_quant_enabled(),
                learnable: fq.is_learnable(),
                learning_enabled: fq.learning_enabled(),
            })
            .collect();
        self.0.push(ModuleInfo {
            path: path.dotted(),
            kind: m.kind(),
            type_name: m.type_name(),
            stage: m.stage(),
            qconfig: m.qconfig().copied(),
            fake_quants,
        });
        Ok(())
    }
}

/// Every layer with its path, kind, stage, qconfig and fake-quant state.
pub fn named_modules<M: Quantizable>(model: &M) -> Result<Vec<ModuleInfo>> {
    let mut c = Collect(Vec::new());
    model.visit(&mut ModulePath::root(), &mut c)?;
    Ok(c.0)
}

fn fmt_qparams(q: &QParams) -> String {
    match q {
        QParams::PerTensor { scale, zero_point } => format!("scale={scale:.6e} zp={zero_point}"),
        QParams::PerChannel {
            scale,
            zero_point,
            axis,
        } => {
            let (lo, hi) = scale
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &s| {
                    (a.min(s), b.max(s))
                });
            let zps: std::collections::BTreeSet<_> = zero_point.iter().collect();
            format!(
                "per-channel axis={axis} ({} ch) scale={lo:.3e}..{hi:.3e} zp={zps:?}",
                scale.len()
            )
        }
    }
}

/// The module tree as text, one line per layer with its kind and stage, and one line per
/// fake-quant with its observer, range, toggles, whether it is learnable (`lsq`: static
/// estimation, `lsq-learning`: scale and zero point trained) and its current qparams.
pub fn summary<M: Quantizable>(model: &M) -> Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    for m in named_modules(model)? {
        let _ = writeln!(out, "{:<28} {:<16} {:?}", m.path, m.kind, m.stage);
        if let Some(qc) = m.qconfig.filter(|q| !matches!(q.scheme, Scheme::Eager)) {
            let _ = writeln!(out, "    {:<10} {}", "scheme", qc.scheme.describe());
        }
        for f in &m.fake_quants {
            let lsq = match (f.learnable, f.learning_enabled) {
                (false, _) => "",
                (true, false) => " lsq",
                (true, true) => " lsq-learning",
            };
            let _ = writeln!(
                out,
                "    {:<10} {} [{}..{}] {}{}{} {}",
                f.role,
                f.observer,
                f.quant_range.0,
                f.quant_range.1,
                if f.observer_enabled {
                    "obs "
                } else {
                    "obs-off "
                },
                if f.fake_quant_enabled { "fq" } else { "fq-off" },
                lsq,
                fmt_qparams(&f.qparams)
            );
        }
    }
    Ok(out)
}
