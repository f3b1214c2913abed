//! `FakeQuantize`: an observer plus a fake-quant op, with PyTorch's toggles. The learnable
//! (LSQ) flavour keeps scale and zero point as candle `Var`s.

use candle_core::{Device, Tensor, Var};

use super::spec::{FakeQuantizeSpec, LearnableSpec, ObserverKind};
use super::{fake_quantize, fake_quantize_learnable};
use crate::error::{Error, Result};
use crate::observer::{Observer, ObserverState};
use crate::qparams::{QParams, QuantRange};

#[derive(Debug)]
struct Learnable {
    scale: Var,
    zero_point: Var,
    use_grad_scaling: bool,
    learning_enabled: bool,
}

/// A copy with its own Vars: a clone of a model trains its own scales (cloning a `Var` would
/// share its storage with the original).
impl Clone for Learnable {
    fn clone(&self) -> Self {
        // `detach` drops the variable flag, so `from_tensor` copies the storage. The Vars are
        // small f32 CPU tensors (see `with_channels`), whose copy cannot fail.
        let own = |v: &Var| {
            Var::from_tensor(&v.as_tensor().detach())
                .expect("copying a small f32 CPU tensor cannot fail")
        };
        Learnable {
            scale: own(&self.scale),
            zero_point: own(&self.zero_point),
            use_grad_scaling: self.use_grad_scaling,
            learning_enabled: self.learning_enabled,
        }
    }
}

/// Observes what goes through it and fake-quantizes it: PyTorch's `FakeQuantize` (and, when
/// the spec is learnable, `_LearnableFakeQuantize`).
///
/// In training, PyTorch's order is kept: the observer first sees the batch and the qparams
/// buffers are updated, then the same batch is quantized with the new qparams.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::qconfig::{Backend, QConfig};
/// let mut fq = QConfig::default_qat(Backend::X86).activation.build()?;
/// let x = Tensor::new(&[0.0f32, 0.5, 1.27], &Device::Cpu)?;
/// let y = fq.forward(&x)?;
/// assert_eq!(fq.zero_point(), vec![0]);
/// assert_eq!(fq.scale(), vec![1.27f32 / 127.0]);
/// assert_eq!(y.to_vec1::<f32>()?[2], 1.27);
/// fq.disable_observer(); // freeze qparams, keep fake-quantizing
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct FakeQuantize {
    spec: FakeQuantizeSpec,
    observer: Box<dyn Observer>,
    range: QuantRange,
    scale: Vec<f32>,
    zero_point: Vec<i32>,
    observer_enabled: bool,
    fake_quant_enabled: bool,
    learnable: Option<Learnable>,
}

/// The saved state of a [`FakeQuantize`].
#[derive(Clone, Debug, PartialEq)]
pub struct FakeQuantizeState {
    /// Current scales.
    pub scale: Vec<f32>,
    /// Current zero points (f32 so that learnable zero points keep their fraction).
    pub zero_point: Vec<f32>,
    /// Whether the observer updates the qparams.
    pub observer_enabled: bool,
    /// Whether the op fake-quantizes (else identity).
    pub fake_quant_enabled: bool,
    /// Whether LSQ parameters receive gradients (learnable only).
    pub learning_enabled: bool,
    /// The observer's statistics.
    pub observer: ObserverState,
}

impl FakeQuantize {
    /// A fresh fake-quant from its spec (scale 1.0, zero point 0 until the first observation).
    /// A per-channel learnable spec needs the channel count: use
    /// [`FakeQuantize::with_channels`].
    pub fn new(spec: &FakeQuantizeSpec) -> Result<Self> {
        if spec.learnable.is_some() && spec.observer.config.qscheme.is_per_channel() {
            return Err(Error::config(
                "a per-channel learnable fake-quant needs to know its channel count",
                "build it with FakeQuantize::with_channels(spec, channels)",
            ));
        }
        Self::with_channels(spec, 1)
    }

    /// A fresh fake-quant whose learnable scale and zero point have `channels` entries.
    pub fn with_channels(spec: &FakeQuantizeSpec, channels: usize) -> Result<Self> {
        let observer = spec.observer.build()?;
        let range = observer.quant_range();
        let channels = if spec.observer.config.qscheme.is_per_channel() {
            channels
        } else {
            1
        };
        let learnable = match spec.learnable {
            None => None,
            Some(l) => Some(Learnable {
                scale: Var::from_vec(vec![l.init_scale; channels], channels, &Device::Cpu)?,
                zero_point: Var::from_vec(
                    vec![l.init_zero_point; channels],
                    channels,
                    &Device::Cpu,
                )?,
                use_grad_scaling: l.use_grad_scaling,
                learning_enabled: false,
            }),
        };
        // PyTorch starts the buffers at (1.0, 0); a fixed-qparams observer knows its own.
        let initial = observer.calculate_qparams()?;
        Ok(FakeQuantize {
            spec: *spec,
            range,
            scale: initial.scales().to_vec(),
            zero_point: initial.zero_points().to_vec(),
            observer,
            observer_enabled: true,
            fake_quant_enabled: true,
            learnable,
        })
    }

    /// The spec this fake-quant was built from.
    pub fn spec(&self) -> &FakeQuantizeSpec {
        &self.spec
    }

    /// Observes (if enabled), then fake-quantizes (if enabled) `x`.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        if x.elem_count() == 0 {
            return Ok(x.clone());
        }
        if self.learnable.is_some() {
            return self.forward_learnable(x);
        }
        if self.observer_enabled {
            self.observer.observe(x)?;
            let qp = self.observer.calculate_qparams()?;
            self.scale = qp.scales().to_vec();
            self.zero_point = qp.zero_points().to_vec();
        }
        if !self.fake_quant_enabled {
            return Ok(x.clone());
        }
        fake_quantize(x, &self.qparams_for(x)?, &self.range)
    }

    fn forward_learnable(&mut self, x: &Tensor) -> Result<Tensor> {
        let eps = self.spec.observer.config.eps;
        let symmetric = self.spec.observer.config.qscheme.is_symmetric();
        let axis = self.observer.ch_axis();
        let quant_max = self.range.quant_max();
        let Some(l) = self.learnable.as_mut() else {
            return Err(Error::config(
                "not a learnable fake-quant",
                "report this as a bug",
            ));
        };
        if self.observer_enabled {
            self.observer.observe(x)?;
            let qp = self.observer.calculate_qparams()?;
            let n = l.scale.elem_count();
            if qp.scales().len() == n {
                let zp: Vec<f32> = qp.zero_points().iter().map(|&z| z as f32).collect();
                l.scale
                    .set(&Tensor::from_vec(qp.scales().to_vec(), n, &Device::Cpu)?)?;
                l.zero_point.set(&Tensor::from_vec(zp, n, &Device::Cpu)?)?;
            }
        } else {
            l.scale.set(&l.scale.as_tensor().clamp(eps, f32::MAX)?)?;
        }
        if !self.fake_quant_enabled {
            return Ok(x.clone());
        }
        if symmetric {
            l.zero_point.set(&l.zero_point.as_tensor().zeros_like()?)?;
        }
        let grad_factor = if l.use_grad_scaling {
            (1.0 / ((x.elem_count() as f64) * quant_max as f64).sqrt()) as f32
        } else {
            1.0
        };
        let (s, z) = if l.learning_enabled {
            (
                l.scale.as_tensor().clone(),
                l.zero_point.as_tensor().clone(),
            )
        } else {
            (
                l.scale.as_tensor().detach(),
                l.zero_point.as_tensor().detach(),
            )
        };
        let (s, z) = (s.to_device(x.device())?, z.to_device(x.device())?);
        fake_quantize_learnable(x, &s, &z, axis, &self.range, grad_factor)
    }

    fn qparams_for(&self, x: &Tensor) -> Result<QParams> {
        match self.observer.ch_axis() {
            None => Ok(QParams::PerTensor {
                scale: self.scale[0],
                zero_point: self.zero_point[0],
            }),
            Some(axis) => {
                let channels = x.dims().get(axis).copied().unwrap_or(0);
                if self.scale.len() != channels {
                    return Err(Error::qparams(
                        format!(
                            "{} holds {} per-channel scales but the input has {channels} \
                             channels along axis {axis}",
                            self.observer.name(),
                            self.scale.len()
                        ),
                        "let the observer see a batch first (enable_observer), or load qparams \
                         saved for this shape",
                    ));
                }
                Ok(QParams::PerChannel {
                    scale: self.scale.clone(),
                    zero_point: self.zero_point.clone(),
                    axis,
                })
            }
        }
    }

    /// Current scales (one per tensor or per channel).
    pub fn scale(&self) -> Vec<f32> {
        match &self.learnable {
            Some(l) => l.scale.as_tensor().to_vec1().unwrap_or_default(),
            None => self.scale.clone(),
        }
    }

    /// Current zero points (a learnable one rounded as the forward uses it).
    pub fn zero_point(&self) -> Vec<i32> {
        match &self.learnable {
            Some(l) => {
                let (lo, hi) = (self.range.quant_min() as f32, self.range.quant_max() as f32);
                l.zero_point
                    .as_tensor()
                    .to_vec1::<f32>()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|z| z.round_ties_even().clamp(lo, hi) as i32)
                    .collect()
            }
            None => self.zero_point.clone(),
        }
    }

    /// Current qparams.
    pub fn qparams(&self) -> QParams {
        let (scale, zero_point) = (self.scale(), self.zero_point());
        match self.observer.ch_axis() {
            Some(axis) => QParams::PerChannel {
                scale,
                zero_point,
                axis,
            },
            None => QParams::PerTensor {
                scale: scale.first().copied().unwrap_or(1.0),
                zero_point: zero_point.first().copied().unwrap_or(0),
            },
        }
    }

    /// The effective code range.
    pub fn quant_range(&self) -> QuantRange {
        self.range
    }

    /// The observer.
    pub fn observer(&self) -> &dyn Observer {
        self.observer.as_ref()
    }

    /// Turns qparam updates on.
    pub fn enable_observer(&mut self) {
        self.observer_enabled = true;
    }
    /// Freezes the qparams.
    pub fn disable_observer(&mut self) {
        self.observer_enabled = false;
    }
    /// Turns fake quantization on.
    pub fn enable_fake_quant(&mut self) {
        self.fake_quant_enabled = true;
    }
    /// Makes the module an identity (the observer may still run).
    pub fn disable_fake_quant(&mut self) {
        self.fake_quant_enabled = false;
    }
    /// Whether the observer runs.
    pub fn observer_enabled(&self) -> bool {
        self.observer_enabled
    }
    /// Whether fake quantization runs.
    pub fn fake_quant_enabled(&self) -> bool {
        self.fake_quant_enabled
    }

    /// LSQ: learn scale and zero point by gradient (observer off, fake quant on), as
    /// PyTorch's `enable_param_learning`. No effect on a non-learnable fake-quant.
    pub fn enable_param_learning(&mut self) {
        if let Some(l) = self.learnable.as_mut() {
            l.learning_enabled = true;
            self.observer_enabled = false;
            self.fake_quant_enabled = true;
        }
    }

    /// LSQ: qparams from the observer, fake quant on, no learning (PyTorch's
    /// `enable_static_estimate`).
    pub fn enable_static_estimate(&mut self) {
        if let Some(l) = self.learnable.as_mut() {
            l.learning_enabled = false;
            self.observer_enabled = true;
            self.fake_quant_enabled = true;
        }
    }

    /// Makes this fake-quant learnable (LSQ, PyTorch's `_LearnableFakeQuantize`) in place: its
    /// scale and zero point become `Var`s, starting from the qparams it holds now if its
    /// observer has seen data (else from `spec`'s initial values). It starts in static
    /// estimation (the observer still sets the qparams, no gradient reaches them) until
    /// [`FakeQuantize::enable_param_learning`]. Already learnable: unchanged.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use qat_core::qconfig::{Backend, LearnableSpec, QConfig};
    /// let mut fq = QConfig::default_qat(Backend::X86).activation.build()?;
    /// fq.forward(&Tensor::new(&[0.0f32, 2.54], &Device::Cpu)?)?;
    /// fq.make_learnable(LearnableSpec::default())?;
    /// assert!(fq.is_learnable());
    /// assert_eq!(fq.scale(), vec![0.02]); // kept what the observer found
    /// fq.enable_param_learning();
    /// assert_eq!(fq.learnable_vars().len(), 2);
    /// # Ok::<(), qat_core::Error>(())
    /// ```
    pub fn make_learnable(&mut self, spec: LearnableSpec) -> Result<()> {
        if self.learnable.is_some() {
            return Ok(());
        }
        let observed = self.observer.min_max().is_some();
        if self.observer.ch_axis().is_some() && !observed {
            return Err(Error::config(
                format!(
                    "a per-channel fake-quant ({}) that has not observed data yet cannot become \
                     learnable: its channel count is unknown",
                    self.observer.name()
                ),
                "run a calibration forward (observers on) before making it learnable, or \
                 build it learnable from the start (FakeQuantizeSpec::builder().learnable(true))",
            ));
        }
        let (scale, zero_point): (Vec<f32>, Vec<f32>) = if observed {
            (
                self.scale.clone(),
                self.zero_point.iter().map(|&z| z as f32).collect(),
            )
        } else {
            (vec![spec.init_scale], vec![spec.init_zero_point])
        };
        for &s in &scale {
            crate::qparams::check_scale(s)?;
        }
        let n = scale.len();
        self.learnable = Some(Learnable {
            scale: Var::from_vec(scale, n, &Device::Cpu)?,
            zero_point: Var::from_vec(zero_point, n, &Device::Cpu)?,
            use_grad_scaling: spec.use_grad_scaling,
            learning_enabled: false,
        });
        self.spec.learnable = Some(spec);
        Ok(())
    }

    /// Whether the scale and zero point are learnable (LSQ).
    pub fn is_learnable(&self) -> bool {
        self.learnable.is_some()
    }

    /// Whether a learnable fake-quant's scale and zero point receive gradients (see
    /// [`FakeQuantize::enable_param_learning`]); false for the others.
    pub fn learning_enabled(&self) -> bool {
        self.learnable.as_ref().is_some_and(|l| l.learning_enabled)
    }

    /// The learnable scale and zero point, to hand to an optimizer (empty if not LSQ).
    pub fn learnable_vars(&self) -> Vec<Var> {
        self.learnable
            .iter()
            .flat_map(|l| [l.scale.clone(), l.zero_point.clone()])
            .collect()
    }

    /// A copy of everything needed to resume.
    pub fn state(&self) -> FakeQuantizeState {
        FakeQuantizeState {
            scale: self.scale(),
            zero_point: match &self.learnable {
                Some(l) => l.zero_point.as_tensor().to_vec1().unwrap_or_default(),
                None => self.zero_point.iter().map(|&z| z as f32).collect(),
            },
            observer_enabled: self.observer_enabled,
            fake_quant_enabled: self.fake_quant_enabled,
            learning_enabled: self.learnable.as_ref().is_some_and(|l| l.learning_enabled),
            observer: self.observer.state(),
        }
    }

    /// Checks that [`FakeQuantize::load_state`] would accept `state`, changing nothing: what a
    /// transactional load runs on every fake-quant before it restores any.
    pub fn check_state(&self, state: &FakeQuantizeState) -> Result<()> {
        self.checked_observer(state).map(|_| ())
    }

    /// The observer loaded with `state`'s statistics, after every check `load_state` makes.
    fn checked_observer(&self, state: &FakeQuantizeState) -> Result<Box<dyn Observer>> {
        if state.scale.len() != state.zero_point.len() || state.scale.is_empty() {
            return Err(Error::state(
                format!(
                    "{} scales and {} zero points",
                    state.scale.len(),
                    state.zero_point.len()
                ),
                "load a state saved from a fake-quant of the same configuration",
            ));
        }
        for &s in &state.scale {
            crate::qparams::check_scale(s)?;
        }
        self.check_channel_count(state)?;
        match &self.learnable {
            Some(l) if state.scale.len() != l.scale.elem_count() => {
                return Err(Error::state(
                    format!(
                        "{} scales for a learnable fake-quant of {}",
                        state.scale.len(),
                        l.scale.elem_count()
                    ),
                    "load a state saved from a fake-quant with the same channel count",
                ))
            }
            Some(_) => {}
            None => {
                for &z in &state.zero_point {
                    if !(z.is_finite() && z.fract() == 0.0) {
                        return Err(Error::state(
                            format!("zero point {z} is not an integer"),
                            "load a state saved from a non-learnable fake-quant",
                        ));
                    }
                    self.range.check_zero_point(z as i32)?;
                }
            }
        }
        let mut observer = self.observer.box_clone();
        observer.load_state(&state.observer)?;
        Ok(observer)
    }

    /// A state's scale count fits this fake-quant: one for a per-tensor fake-quant; for a
    /// per-channel one, the channel count of the statistics saved with it, and of the
    /// statistics this fake-quant already holds (a fresh one knows no channel count yet).
    fn check_channel_count(&self, state: &FakeQuantizeState) -> Result<()> {
        let n = state.scale.len();
        let mismatch = |what: String| {
            Err(Error::state(
                format!("{n} scales for a fake-quant with {what}"),
                "load a state saved from a fake-quant of the same scheme and channel count",
            ))
        };
        if self.observer.ch_axis().is_none() {
            return if n == 1 {
                Ok(())
            } else {
                mismatch("one scale (per tensor)".into())
            };
        }
        let saved = state.observer.min_val.len();
        if saved > 0 && saved != n {
            return mismatch(format!("{saved} channels in its saved statistics"));
        }
        let own = self.observer.state().min_val.len();
        if own > 0 && own != n {
            return mismatch(format!("{own} channels"));
        }
        Ok(())
    }

    /// Restores a saved state. Everything is checked first ([`FakeQuantize::check_state`]): an
    /// error leaves the fake-quant as it was.
    pub fn load_state(&mut self, state: &FakeQuantizeState) -> Result<()> {
        let observer = self.checked_observer(state)?;
        if let Some(l) = self.learnable.as_ref() {
            // Built before anything changes; `Var::set` of a same-shaped tensor cannot fail.
            let n = l.scale.elem_count();
            let scale = Tensor::from_vec(state.scale.clone(), n, &Device::Cpu)?;
            let zero_point = Tensor::from_vec(state.zero_point.clone(), n, &Device::Cpu)?;
            l.scale.set(&scale)?;
            l.zero_point.set(&zero_point)?;
        }
        self.observer = observer;
        match self.learnable.as_mut() {
            Some(l) => l.learning_enabled = state.learning_enabled,
            None => {
                self.scale = state.scale.clone();
                self.zero_point = state.zero_point.iter().map(|&z| z as i32).collect();
            }
        }
        self.observer_enabled = state.observer_enabled;
        self.fake_quant_enabled = state.fake_quant_enabled;
        Ok(())
    }

    /// Whether the qparams come from data: the observer has seen a non-empty tensor (empty
    /// batches do not count), the qparams are fixed (sigmoid, tanh), or LSQ learns them. A
    /// fake-quant that is not calibrated still holds its initial scale 1.0.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use qat_core::qconfig::{Backend, QConfig};
    /// let mut fq = QConfig::default_qat(Backend::X86).activation.build()?;
    /// fq.forward(&Tensor::zeros(0, DType::F32, &Device::Cpu)?)?; // an empty batch
    /// assert!(!fq.is_calibrated());
    /// fq.forward(&Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?)?;
    /// assert!(fq.is_calibrated());
    /// # Ok::<(), qat_core::Error>(())
    /// ```
    pub fn is_calibrated(&self) -> bool {
        matches!(self.spec.observer.kind, ObserverKind::FixedQParams { .. })
            || self.observer.min_max().is_some()
            || self.learnable.as_ref().is_some_and(|l| l.learning_enabled)
    }

    /// A copy that shares nothing with `self`: a learnable fake-quant's scale and zero point
    /// are copied into new `Var`s. What a pass works on before it commits.
    pub fn detached_copy(&self) -> Result<Self> {
        let mut copy = self.clone();
        // A clone already has its own Vars; copying them here keeps this independent of that.
        if let Some(l) = copy.learnable.as_mut() {
            l.scale = Var::from_tensor(&l.scale.as_tensor().copy()?)?;
            l.zero_point = Var::from_tensor(&l.zero_point.as_tensor().copy()?)?;
        }
        Ok(copy)
    }
}
