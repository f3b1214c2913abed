//! The intx fake-quantization ops: torchao 0.18's `IntxFakeQuantizer` forward with its
//! straight-through backward, and the range-learning variant with gradients into the scale
//! and zero point.
//!
//! On the CPU the forward is one fused candle `CustomOp1` (each group's qparams from its
//! min/max, then its outputs, in one read of the input) and its backward one fused
//! `CustomOp2`; on other devices the same arithmetic runs as candle ops
//! ([`intx_fake_quantize_composite`]), with the same values and gradients. See
//! `intx_kernel` for the arithmetic and `intx` for the qparams rules.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use super::intx::{IntxGranularity, IntxSpec};
use super::intx_kernel::{self as k, GroupParams, Narrow, QRule, Rule, MAX_ZERO_POINT};
use super::op::check_float_input;
use crate::error::{Error, Result};

/// The scales and zero points of an intx fake quantization, as torchao keeps them after a
/// forward: f32 tensors of shape `[rows, groups]` (per group), `[rows, 1]` (per axis) or
/// the input's leading dims (per token). Zero points are integers stored as f32 (0 when
/// symmetric); a group whose input holds a NaN has a NaN scale and zero point.
#[derive(Clone, Debug)]
pub struct IntxQParams {
    scale: Tensor,
    zero_point: Tensor,
}

impl IntxQParams {
    /// Wraps a scale and a zero point tensor (f32, the same shape; checked against an input
    /// when they are used).
    pub fn new(scale: Tensor, zero_point: Tensor) -> Result<Self> {
        if scale.dims() != zero_point.dims() {
            return Err(Error::qparams(
                format!(
                    "intx scale has shape {:?}, zero point {:?}",
                    scale.dims(),
                    zero_point.dims()
                ),
                "give one zero point per scale",
            ));
        }
        Ok(IntxQParams {
            scale: scale.to_dtype(DType::F32)?,
            zero_point: zero_point.to_dtype(DType::F32)?,
        })
    }

    /// The scales (f32).
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }

    /// The zero points (f32, integer-valued).
    pub fn zero_point(&self) -> &Tensor {
        &self.zero_point
    }

    fn from_groups(p: &GroupParams, shape: &[usize], dev: &candle_core::Device) -> Result<Self> {
        Ok(IntxQParams {
            scale: Tensor::from_slice(&p.scale, shape, dev)?,
            zero_point: Tensor::from_slice(&p.zero_point, shape, dev)?,
        })
    }

    fn to_groups(&self) -> Result<GroupParams> {
        Ok(GroupParams {
            scale: self.scale.flatten_all()?.to_vec1::<f32>()?,
            zero_point: self.zero_point.flatten_all()?.to_vec1::<f32>()?,
        })
    }
}

fn narrow_of(dt: DType) -> Narrow {
    match dt {
        DType::F16 => Narrow::F16,
        DType::BF16 => Narrow::BF16,
        _ => Narrow::F32,
    }
}

/// The qparams rule of `spec` for data of dtype `dt`.
pub(crate) fn qrule(spec: &IntxSpec, dt: DType) -> QRule {
    let narrow = narrow_of(dt);
    let (qmin, qmax) = (spec.quant_min() as f32, spec.quant_max() as f32);
    let (rule, default_eps) = match (spec.granularity(), spec.is_symmetric()) {
        (IntxGranularity::PerToken, _) => (Rule::Asymmetric, narrow.smallest_normal()),
        (_, true) => (
            Rule::Symmetric {
                div: (qmax - qmin) / 2.0,
            },
            narrow.smallest_normal(),
        ),
        (_, false) => (
            Rule::Tinygemm {
                levels: ((1u32 << spec.bits()) - 1) as f32,
                mid: (1u32 << (spec.bits() - 1)) as f32,
            },
            1e-6,
        ),
    };
    QRule {
        rule,
        qmin,
        qmax,
        eps: narrow.round(spec.eps().unwrap_or(default_eps)),
        narrow,
    }
}

fn check_zero_points(p: &GroupParams) -> Result<()> {
    match p.oversized_zero_point() {
        Some(z) => Err(Error::qparams(
            format!(
                "an asymmetric per-group zero point is {z} (torchao's is min + scale * \
                 2^(bits-1), so a group offset far from 0), beyond ±{MAX_ZERO_POINT}"
            ),
            "use symmetric per-group quantization for this tensor, or remove the offset",
        )),
        None => Ok(()),
    }
}

/// Runs `f` on the f32 data of a contiguous CPU storage (f16/bf16 widened first) and
/// returns its output in the storage's dtype.
fn on_f32(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    f: impl FnOnce(&[f32]) -> Vec<f32>,
) -> candle_core::Result<CpuStorage> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input is not contiguous")))?;
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(f(&v[a..b])),
        CpuStorage::F16(v) => {
            let x: Vec<f32> = v[a..b].iter().map(|h| h.to_f32()).collect();
            CpuStorage::F16(f(&x).into_iter().map(half::f16::from_f32).collect())
        }
        CpuStorage::BF16(v) => {
            let x: Vec<f32> = v[a..b].iter().map(|h| h.to_f32()).collect();
            CpuStorage::BF16(f(&x).into_iter().map(half::bf16::from_f32).collect())
        }
        _ => candle_core::bail!("{op}: dtype {:?} is not supported", s.dtype()),
    })
}

fn widen(s: &CpuStorage, l: &Layout, op: &str) -> candle_core::Result<Vec<f32>> {
    let mut out = Vec::new();
    on_f32(s, l, op, |x| {
        out = x.to_vec();
        Vec::new()
    })?;
    Ok(out)
}

/// Where the fused forward leaves the qparams it computed (read by the caller and by the
/// backward).
type Slot = Arc<Mutex<Option<Arc<GroupParams>>>>;

fn read_slot(slot: &Slot) -> Option<Arc<GroupParams>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// The qparams of a slot the caller owns: taken out when nothing else holds the slot (the
/// op was dropped: no gradient graph keeps it for its backward), else shared.
fn take_slot(slot: Slot) -> Option<Arc<GroupParams>> {
    match Arc::try_unwrap(slot) {
        Ok(m) => m.into_inner().unwrap_or_else(PoisonError::into_inner),
        Err(slot) => read_slot(&slot),
    }
}

/// Where the fused dynamic forward leaves the straight-through mask it wrote (one bit per
/// element, see `intx_kernel::forward_dynamic_masked`), for its backward.
type MaskSlot = Arc<Mutex<Option<Arc<Vec<u8>>>>>;

/// The fused CPU forward: dynamic (qparams computed here and left in `slot`) or static
/// (qparams given). A dynamic forward with `mask` also writes the straight-through mask
/// there when the kernels can ([`k::can_mask`]), so that its backward reads the gradient
/// and the mask instead of the gradient and the input.
struct IntxForward {
    rule: QRule,
    len: usize,
    given: Option<Arc<GroupParams>>,
    slot: Slot,
    mask: Option<MaskSlot>,
}

impl CustomOp1 for IntxForward {
    fn name(&self) -> &'static str {
        "intx-fake-quantize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let r = self.rule;
        let out = on_f32(s, l, self.name(), |x| match &self.given {
            Some(p) => {
                let y = k::forward_static(x, self.len, p, r.qmin, r.qmax, r.narrow);
                *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(p.clone());
                y
            }
            None => {
                let (y, p, m) = match &self.mask {
                    Some(_) => k::forward_dynamic_masked(x, self.len, r),
                    None => {
                        let (y, p) = k::forward_dynamic(x, self.len, r);
                        (y, p, None)
                    }
                };
                *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(p));
                if let (Some(slot), Some(m)) = (&self.mask, m) {
                    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(m));
                }
                y
            }
        })?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let params = read_slot(&self.slot).ok_or_else(|| {
            candle_core::Error::Msg("intx-fake-quantize: backward before forward".into())
        })?;
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        let mask = self
            .mask
            .as_ref()
            .and_then(|m| m.lock().unwrap_or_else(PoisonError::into_inner).clone());
        if let Some(mask) = mask {
            let grad = IntxMaskedGrad {
                len: self.len,
                params,
                mask,
            };
            return Ok(Some(dy.apply_op1_no_bwd(&grad)?));
        }
        let grad = IntxGrad {
            rule: self.rule,
            len: self.len,
            params,
        };
        Ok(Some(x.apply_op2_no_bwd(&dy, &grad)?))
    }
}

/// The fused straight-through backward.
struct IntxGrad {
    rule: QRule,
    len: usize,
    params: Arc<GroupParams>,
}

impl CustomOp2 for IntxGrad {
    fn name(&self) -> &'static str {
        "intx-fake-quantize-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "{}: x has shape {:?}, grad {:?}",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        let r = self.rule;
        let run = |x: &[f32], dy: &[f32]| {
            k::backward(x, dy, self.len, &self.params, r.qmin, r.qmax, r.narrow)
        };
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(dy)) => {
                let (a, b) = l2.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg(format!("{}: grad is not contiguous", self.name()))
                })?;
                let dy = &dy[a..b];
                on_f32(s1, l1, self.name(), |x| run(x, dy))?
            }
            _ => {
                let dy = widen(s2, l2, self.name())?;
                on_f32(s1, l1, self.name(), |x| run(x, &dy))?
            }
        };
        Ok((out, l1.shape().clone()))
    }
}

/// The fused straight-through backward from the forward's mask: reads the gradient and
/// the mask only (f32 data: the forward writes a mask for f32 only).
struct IntxMaskedGrad {
    len: usize,
    params: Arc<GroupParams>,
    mask: Arc<Vec<u8>>,
}

impl CustomOp1 for IntxMaskedGrad {
    fn name(&self) -> &'static str {
        "intx-fake-quantize-masked-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: grad is not contiguous", self.name()))
        })?;
        let CpuStorage::F32(dy) = s else {
            candle_core::bail!("{}: the gradient is {:?}, not f32", self.name(), s.dtype());
        };
        let dy = &dy[a..b];
        let (len, scale) = (self.len, &self.params.scale);
        if len == 0
            || !len.is_multiple_of(8)
            || self.mask.len() * 8 != dy.len()
            || scale.len() * len != dy.len()
        {
            candle_core::bail!(
                "{}: a gradient of {} elements for a mask of {} bytes and {} groups of {len}",
                self.name(),
                dy.len(),
                self.mask.len(),
                scale.len()
            );
        }
        let dx = k::backward_masked(dy, &self.mask, len, scale);
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

/// Checks the input, returns (elements per group, qparams shape).
fn prepare(x: &Tensor, spec: &IntxSpec, what: &str) -> Result<(usize, Vec<usize>)> {
    check_float_input(x, what)?;
    let len = spec.group_len(x.dims())?;
    Ok((len, spec.qparams_shape(x.dims())?))
}

/// Fake-quantizes `x` as torchao's dynamic `IntxFakeQuantizer(spec)` does: qparams from
/// `x` itself (see [`IntxSpec`]), then `(clamp(round_half_even(x / scale) + zp, qmin,
/// qmax) - zp) * scale`; the gradient is `grad_y` where the unclamped code lies strictly
/// inside the range and 0 elsewhere, none into the qparams. Returns the output (the
/// input's dtype: f32, f16 or bf16) and the qparams. Whatever `spec.is_dynamic()` says,
/// this computes fresh qparams; [`IntxFakeQuantizer`](super::IntxFakeQuantizer) keeps
/// static ones.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::fake_quant::{intx_fake_quantize, IntxSpec};
/// let w = Tensor::new(&[[0.1f32, -0.75, 0.3, 0.5], [2.0, 1.0, -1.0, 0.0]], &Device::Cpu)?;
/// let spec = IntxSpec::builder(4).per_group(2).build()?;
/// let (y, qp) = intx_fake_quantize(&w, &spec)?;
/// // Group [0.1, -0.75]: scale 0.75 / 7.5 = 0.1; -0.75 is code -7.5, which rounds to -8.
/// assert_eq!(qp.scale().to_vec2::<f32>()?[0][0], 0.1);
/// assert_eq!(y.to_vec2::<f32>()?[0][..2], [0.1, -0.8]);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn intx_fake_quantize(x: &Tensor, spec: &IntxSpec) -> Result<(Tensor, IntxQParams)> {
    let (len, shape) = prepare(x, spec, "intx_fake_quantize")?;
    if !x.device().is_cpu() {
        return intx_fake_quantize_composite(x, spec);
    }
    if x.elem_count() == 0 {
        let p = GroupParams::default();
        return Ok((x.clone(), IntxQParams::from_groups(&p, &shape, x.device())?));
    }
    let slot: Slot = Arc::default();
    let rule = qrule(spec, x.dtype());
    // A mask only where a gradient graph keeps the op for its backward.
    let op = IntxForward {
        rule,
        len,
        given: None,
        slot: slot.clone(),
        mask: (x.track_op() && k::can_mask(len, rule.narrow)).then(MaskSlot::default),
    };
    let y = x.contiguous()?.apply_op1(op)?;
    let p = take_slot(slot).ok_or_else(|| {
        Error::state(
            "the intx forward left no qparams",
            "report this as a candle-qat bug",
        )
    })?;
    check_zero_points(&p)?;
    let dev = x.device();
    // Without a gradient graph the op is gone and the qparams are ours alone: they become
    // the tensors without a copy.
    Ok(match Arc::try_unwrap(p) {
        Ok(GroupParams { scale, zero_point }) => (
            y,
            IntxQParams {
                scale: Tensor::from_vec(scale, shape.as_slice(), dev)?,
                zero_point: Tensor::from_vec(zero_point, shape.as_slice(), dev)?,
            },
        ),
        Err(p) => (y, IntxQParams::from_groups(&p, &shape, dev)?),
    })
}

fn check_qparams_shape(qp: &IntxQParams, shape: &[usize], dims: &[usize]) -> Result<()> {
    if qp.scale.dims() != shape {
        return Err(Error::qparams(
            format!(
                "intx qparams of shape {:?} for an input of shape {dims:?}, which needs \
                 {shape:?}",
                qp.scale.dims()
            ),
            "use qparams computed from an input of the same shape (static per-token \
             qparams fix the number of tokens)",
        ));
    }
    Ok(())
}

/// Fake-quantizes `x` with given qparams (a static quantizer's), as constants: the same
/// forward and straight-through gradient as [`intx_fake_quantize`].
pub fn intx_fake_quantize_with(
    x: &Tensor,
    qparams: &IntxQParams,
    spec: &IntxSpec,
) -> Result<Tensor> {
    let (len, shape) = prepare(x, spec, "intx_fake_quantize_with")?;
    check_qparams_shape(qparams, &shape, x.dims())?;
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    if !x.device().is_cpu() {
        return composite_forward(x, qparams, spec, len);
    }
    let p = qparams.to_groups()?;
    check_zero_points(&p)?;
    let op = IntxForward {
        rule: qrule(spec, x.dtype()),
        len,
        given: Some(Arc::new(p)),
        slot: Arc::default(),
        mask: None,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// The qparams torchao would compute from `x` (no fake quantization).
pub fn intx_qparams(x: &Tensor, spec: &IntxSpec) -> Result<IntxQParams> {
    let (len, shape) = prepare(x, spec, "intx_qparams")?;
    if !x.device().is_cpu() {
        return composite_qparams(x, spec, len, &shape);
    }
    let r = qrule(spec, x.dtype());
    let xs = x
        .detach()
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let p = if xs.is_empty() {
        GroupParams::default()
    } else {
        k::qparams_only(&xs, len, r)
    };
    check_zero_points(&p)?;
    IntxQParams::from_groups(&p, &shape, x.device())
}

/// The straight-through backward of [`intx_fake_quantize_with`] on its own (the kernel
/// autograd runs). Exposed for benchmarks and tests.
#[doc(hidden)]
pub fn intx_fake_quantize_backward(
    x: &Tensor,
    grad_y: &Tensor,
    qparams: &IntxQParams,
    spec: &IntxSpec,
) -> Result<Tensor> {
    let (len, shape) = prepare(x, spec, "intx_fake_quantize_backward")?;
    check_qparams_shape(qparams, &shape, x.dims())?;
    if grad_y.dims() != x.dims() {
        return Err(Error::tensor(
            format!(
                "intx_fake_quantize_backward: grad_y has shape {:?}, x has {:?}",
                grad_y.dims(),
                x.dims()
            ),
            "pass the gradient of the fake-quant output, which has the input's shape",
        ));
    }
    let dy = grad_y.to_dtype(x.dtype())?.contiguous()?;
    if x.elem_count() == 0 {
        return Ok(dy);
    }
    if !x.device().is_cpu() {
        let xv = candle_core::Var::from_tensor(&x.detach())?;
        let y = composite_forward(xv.as_tensor(), qparams, spec, len)?;
        let grads = (y.to_dtype(DType::F32)? * dy.to_dtype(DType::F32)?)?
            .sum_all()?
            .backward()?;
        return grads
            .get(xv.as_tensor())
            .cloned()
            .ok_or_else(|| Error::state("no gradient for x", "report this as a bug"));
    }
    let grad = IntxGrad {
        rule: qrule(spec, x.dtype()),
        len,
        params: Arc::new(qparams.to_groups()?),
    };
    Ok(x.contiguous()?.apply_op2_no_bwd(&dy, &grad)?)
}

/// The straight-through mask of one [`intx_fake_quantize_masked`] forward (one bit per
/// element) with its scales: what its backward needs instead of the input.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct IntxGradMask {
    len: usize,
    dims: Vec<usize>,
    params: Arc<GroupParams>,
    mask: Arc<Vec<u8>>,
}

/// [`intx_fake_quantize`] (no gradient graph) that also returns the straight-through mask
/// its backward would use under autograd, where the kernels write one (f32 CPU data,
/// groups of a multiple of 8 elements); `None` otherwise. Exposed for benchmarks and
/// tests, with [`intx_fake_quantize_backward_masked`].
#[doc(hidden)]
pub fn intx_fake_quantize_masked(
    x: &Tensor,
    spec: &IntxSpec,
) -> Result<(Tensor, IntxQParams, Option<IntxGradMask>)> {
    let (len, shape) = prepare(x, spec, "intx_fake_quantize_masked")?;
    let rule = qrule(spec, x.dtype());
    if !x.device().is_cpu() || x.elem_count() == 0 || !k::can_mask(len, rule.narrow) {
        let (y, qp) = intx_fake_quantize(&x.detach(), spec)?;
        return Ok((y, qp, None));
    }
    let (slot, masks): (Slot, MaskSlot) = Default::default();
    let op = IntxForward {
        rule,
        len,
        given: None,
        slot: slot.clone(),
        mask: Some(masks.clone()),
    };
    let y = x.detach().contiguous()?.apply_op1(op)?;
    let missing = || {
        Error::state(
            "the intx forward left no qparams or mask",
            "report this as a candle-qat bug",
        )
    };
    let p = take_slot(slot).ok_or_else(missing)?;
    check_zero_points(&p)?;
    let mask = read_slot_mask(&masks).ok_or_else(missing)?;
    let qp = IntxQParams::from_groups(&p, &shape, x.device())?;
    let m = IntxGradMask {
        len,
        dims: x.dims().to_vec(),
        params: p,
        mask,
    };
    Ok((y, qp, Some(m)))
}

fn read_slot_mask(slot: &MaskSlot) -> Option<Arc<Vec<u8>>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// The straight-through backward of an [`intx_fake_quantize_masked`] forward from its
/// mask: the values of [`intx_fake_quantize_backward`] without reading the input.
#[doc(hidden)]
pub fn intx_fake_quantize_backward_masked(grad_y: &Tensor, mask: &IntxGradMask) -> Result<Tensor> {
    if grad_y.dims() != mask.dims.as_slice() {
        return Err(Error::tensor(
            format!(
                "intx_fake_quantize_backward_masked: grad_y has shape {:?}, the forward's \
                 input had {:?}",
                grad_y.dims(),
                mask.dims
            ),
            "pass the gradient of the fake-quant output, which has the input's shape",
        ));
    }
    if !grad_y.device().is_cpu() {
        return Err(Error::tensor(
            "intx_fake_quantize_backward_masked: grad_y is not on the CPU",
            "use intx_fake_quantize_backward on other devices",
        ));
    }
    let grad = IntxMaskedGrad {
        len: mask.len,
        params: mask.params.clone(),
        mask: mask.mask.clone(),
    };
    let dy = grad_y.to_dtype(DType::F32)?.contiguous()?;
    Ok(dy.apply_op1_no_bwd(&grad)?)
}

/// Rounds an f32 tensor to `dt` and back (PyTorch's op on an f16/bf16 tensor); its
/// gradient is rounded the same way.
fn narrow_t(t: &Tensor, dt: DType) -> Result<Tensor> {
    Ok(if dt == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(dt)?.to_dtype(DType::F32)?
    })
}

/// Round half to even for |v| < 2^22 (the kernel's 1.5 * 2^23 trick).
fn round_t(t: &Tensor) -> Result<Tensor> {
    const MAGIC: f64 = 12_582_912.0;
    Ok(t.affine(1.0, MAGIC)?.affine(1.0, -MAGIC)?)
}

fn scalar(v: f32, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::new(v, like.device())?)
}

/// The qparams of [`intx_qparams`] from candle ops (any device).
fn composite_qparams(
    x: &Tensor,
    spec: &IntxSpec,
    len: usize,
    shape: &[usize],
) -> Result<IntxQParams> {
    let dt = x.dtype();
    let r = qrule(spec, dt);
    let n = |t: &Tensor| narrow_t(t, dt);
    let groups = x.elem_count() / len;
    let xf = x.detach().to_dtype(DType::F32)?.reshape((groups, len))?;
    let (min, max) = (xf.min_keepdim(1)?, xf.max_keepdim(1)?);
    let eps = scalar(r.eps, &xf)?;
    let (scale, zp) = match r.rule {
        Rule::Symmetric { div } => {
            let amax = min.minimum(0.0)?.neg()?.maximum(&max.maximum(0.0)?)?;
            let s = n(&amax.broadcast_div(&scalar(div, &xf)?)?)?;
            (s.broadcast_maximum(&eps)?, s.zeros_like()?)
        }
        Rule::Asymmetric => {
            let (lo, hi) = (min.minimum(0.0)?, max.maximum(0.0)?);
            let levels = scalar(r.qmax - r.qmin, &xf)?;
            let s = n(&n(&(hi - &lo)?)?.broadcast_div(&levels)?)?.broadcast_maximum(&eps)?;
            let z = round_t(&n(&lo.div(&s)?)?)?.affine(-1.0, r.qmin as f64)?;
            (s, z.clamp(r.qmin, r.qmax)?)
        }
        Rule::Tinygemm { levels, mid } => {
            let s = n(&n(&(&max - &min)?)?.broadcast_div(&scalar(levels, &xf)?)?)?
                .broadcast_maximum(&eps)?;
            let z = n(&(min + n(&s.affine(mid as f64, 0.0)?)?)?)?;
            // trunc: floor above 0, ceil below.
            let z = z.ge(0.0)?.where_cond(&z.floor()?, &z.ceil()?)?;
            (s, z)
        }
    };
    let qp = IntxQParams {
        scale: scale.reshape(shape)?,
        zero_point: zp.reshape(shape)?,
    };
    check_zero_points(&qp.to_groups()?)?;
    Ok(qp)
}

/// The forward of [`intx_fake_quantize_with`] from candle ops, with the kernel's values and
/// straight-through gradient `round(round(dy * scale) * (1/scale))` (rounding to the input's
/// dtype) where the code is strictly inside the range.
fn composite_forward(x: &Tensor, qp: &IntxQParams, spec: &IntxSpec, len: usize) -> Result<Tensor> {
    let dt = x.dtype();
    let dims = x.dims().to_vec();
    let groups = x.elem_count() / len;
    let (qmin, qmax) = (spec.quant_min() as f64, spec.quant_max() as f64);
    let s = qp
        .scale
        .detach()
        .reshape((groups, 1))?
        .to_device(x.device())?;
    let zp = qp
        .zero_point
        .detach()
        .reshape((groups, 1))?
        .to_device(x.device())?;
    let xf = x.to_dtype(DType::F32)?.reshape((groups, len))?;
    let inv = s.recip()?;
    let t = xf.broadcast_mul(&inv)?;
    let lo = zp.affine(-1.0, qmin)?;
    let hi = zp.affine(-1.0, qmax)?;
    let q = round_t(
        &t.detach()
            .broadcast_maximum(&(&lo - 1.0)?)?
            .broadcast_minimum(&(&hi + 1.0)?)?,
    )?;
    let inside = q.broadcast_gt(&lo)?.mul(&q.broadcast_lt(&hi)?)?;
    let qc = q.broadcast_maximum(&lo)?.broadcast_minimum(&hi)?;
    let value = if dt == DType::F32 {
        qc.broadcast_mul(&s)?
    } else {
        let zp_d = narrow_t(&zp, dt)?;
        let d = narrow_t(&qc.broadcast_add(&zp)?.broadcast_sub(&zp_d)?, dt)?;
        narrow_t(&d.broadcast_mul(&s)?, dt)?
    };
    // Value: `value` exactly (m - m is 0). Gradient: dy * scale, rounded to the dtype,
    // times 1/scale, where inside.
    let m = inside.where_cond(&t, &t.zeros_like()?)?;
    let through = narrow_t(&(&m - m.detach())?, dt)?.broadcast_mul(&s)?;
    Ok((value + through)?.reshape(dims)?.to_dtype(dt)?)
}

/// [`intx_fake_quantize`] from candle ops only (the path of non-CPU devices): the same
/// values, qparams and gradient as the fused CPU op.
pub fn intx_fake_quantize_composite(x: &Tensor, spec: &IntxSpec) -> Result<(Tensor, IntxQParams)> {
    let (len, shape) = prepare(x, spec, "intx_fake_quantize_composite")?;
    if x.elem_count() == 0 {
        let p = GroupParams::default();
        return Ok((x.clone(), IntxQParams::from_groups(&p, &shape, x.device())?));
    }
    let qp = composite_qparams(x, spec, len, &shape)?;
    Ok((composite_forward(x, &qp, spec, len)?, qp))
}

/// Fake quantization with a trainable scale (and zero point), torchao's range-learning
/// forward written as candle ops so that autograd differentiates it as PyTorch does:
/// `q = clamp(round_ste(x * (1/scale)) + zp, qmin, qmax)`, `y = (q - zp) * scale`, where
/// `round_ste` passes the gradient straight through and the clamp passes it only strictly
/// inside the range. `scale` and `zero_point` have the qparams shape of `spec` for `x`
/// (f32; `zero_point` need not be integer).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use qat_core::fake_quant::{intx_fake_quantize_learnable, IntxSpec};
/// let spec = IntxSpec::builder(4).per_axis().dynamic(false).range_learning(true).build()?;
/// let w = Tensor::new(&[[0.1f32, -0.7, 0.3], [2.0, 1.0, -1.0]], &Device::Cpu)?;
/// let scale = Var::new(&[[0.1f32], [0.25]], &Device::Cpu)?;
/// let zp = Tensor::zeros((2, 1), candle_core::DType::F32, &Device::Cpu)?;
/// let y = intx_fake_quantize_learnable(&w, scale.as_tensor(), &zp, &spec)?;
/// let grads = y.sum_all()?.backward()?;
/// assert!(grads.get(scale.as_tensor()).is_some());
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn intx_fake_quantize_learnable(
    x: &Tensor,
    scale: &Tensor,
    zero_point: &Tensor,
    spec: &IntxSpec,
) -> Result<Tensor> {
    let (len, shape) = prepare(x, spec, "intx_fake_quantize_learnable")?;
    for (t, what) in [(scale, "scale"), (zero_point, "zero point")] {
        if t.dims() != shape.as_slice() {
            return Err(Error::qparams(
                format!(
                    "learnable intx {what} of shape {:?} for an input of shape {:?}, which \
                     needs {shape:?}",
                    t.dims(),
                    x.dims()
                ),
                "initialise the quantizer from an input of the same shape",
            ));
        }
    }
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let dt = x.dtype();
    let dims = x.dims().to_vec();
    let groups = x.elem_count() / len;
    let (qmin, qmax) = (spec.quant_min() as f32, spec.quant_max() as f32);
    let s = scale.to_dtype(DType::F32)?.reshape((groups, 1))?;
    let zp = zero_point.to_dtype(DType::F32)?.reshape((groups, 1))?;
    let xf = x.to_dtype(DType::F32)?.reshape((groups, len))?;
    let v = xf.broadcast_mul(&s.recip()?)?;
    // round_ste: the value round(v) (exact: v + (round(v) - v) is round(v) for |v| <= 2^21,
    // and beyond that the code is clamped whatever it is), the gradient 1.
    let lim = MAX_ZERO_POINT as f64;
    let rounded = round_t(&v.detach().clamp(-lim, lim)?)?;
    let rv = (&v + (rounded - &v)?.detach())?;
    let q_pre = rv.broadcast_add(&zp)?;
    let inside = q_pre.gt(qmin as f64)?.mul(&q_pre.lt(qmax as f64)?)?;
    let clamped = q_pre.detach().clamp(qmin, qmax)?;
    let q = (clamped + inside.where_cond(&(&q_pre - q_pre.detach())?, &q_pre.zeros_like()?)?)?;
    let d = narrow_t(&q.broadcast_sub(&narrow_t(&zp, dt)?)?, dt)?;
    Ok(d.broadcast_mul(&s)?.reshape(dims)?.to_dtype(dt)?)
}
