//! Learnable fake quantization (LSQ): PyTorch's `_fake_quantize_learnable_per_tensor_affine`
//! and `_fake_quantize_learnable_per_channel_affine`, with gradients for the input, the scale
//! and the zero point.
//!
//! PyTorch's quirk is kept: per tensor, the forward uses `clamp(nearbyint(zp))` while the
//! backward uses `trunc(clamp(zp + 0.5))`; per channel both use `clamp(round_half_even(zp))`.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{self, LsqGrid, LsqSums};
use super::op::{check_float_input, composite_code, fake_quantize, grid_tensors};
use crate::error::{Error, Result};
use crate::host::{with_cpu_f32, CHUNK};
use crate::qparams::{check_scale, round_half_even, QParams, QuantRange};

/// Zero points as the forward uses them.
fn forward_zero_points(zp: &[f32], range: &QuantRange) -> Vec<i32> {
    let (lo, hi) = (range.quant_min() as f32, range.quant_max() as f32);
    zp.iter()
        .map(|&z| round_half_even(z).clamp(lo, hi) as i32)
        .collect()
}

/// Zero points as the backward uses them (see the module docs).
fn backward_zero_points(zp: &[f32], range: &QuantRange, per_channel: bool) -> Vec<f32> {
    let (lo, hi) = (range.quant_min() as f32, range.quant_max() as f32);
    zp.iter()
        .map(|&z| {
            if per_channel {
                round_half_even(z).clamp(lo, hi)
            } else {
                (z + 0.5).clamp(lo, hi).trunc()
            }
        })
        .collect()
}

#[derive(Clone, Debug)]
struct Lsq {
    range: QuantRange,
    axis: Option<usize>,
    grad_factor: f32,
}

impl Lsq {
    fn qparams(&self, scale: &[f32], zp: &[f32]) -> QParams {
        let zero_point = forward_zero_points(zp, &self.range);
        match self.axis {
            None => QParams::PerTensor {
                scale: scale[0],
                zero_point: zero_point[0],
            },
            Some(axis) => QParams::PerChannel {
                scale: scale.to_vec(),
                zero_point,
                axis,
            },
        }
    }

    fn lsq_grids(&self, scale: &[f32], zp: &[f32]) -> Vec<LsqGrid> {
        backward_zero_points(zp, &self.range, self.axis.is_some())
            .into_iter()
            .zip(scale)
            .map(|(z, &s)| LsqGrid {
                scale: s,
                inv_scale: 1.0 / s,
                zero_point: z,
                quant_min: self.range.quant_min() as f32,
                quant_max: self.range.quant_max() as f32,
                grad_factor: self.grad_factor,
            })
            .collect()
    }
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl CustomOp3 for Lsq {
    fn name(&self) -> &'static str {
        "fake-quantize-learnable"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let read = |s: &CpuStorage, l: &Layout| -> candle_core::Result<Vec<f32>> {
            let v = s.as_slice::<f32>()?;
            match l.contiguous_offsets() {
                Some((a, b)) => Ok(v[a..b].to_vec()),
                None => candle_core::bail!("{}: qparams must be contiguous", self.name()),
            }
        };
        let (scale, zp) = (read(s2, l2)?, read(s3, l3)?);
        let x = s1.as_slice::<f32>()?;
        let x = match l1.contiguous_offsets() {
            Some((a, b)) => &x[a..b],
            None => candle_core::bail!("{}: input must be contiguous", self.name()),
        };
        let grids = super::op::Grids::build(&self.qparams(&scale, &zp), &self.range, l1.dims())
            .map_err(candle_core::Error::wrap)?;
        let fill = |off: usize, out: &mut [MaybeUninit<f32>]| {
            let n = out.len();
            grids.for_runs(off, n, |g, a, b| {
                kernel::forward(&x[off + a..off + b], &mut out[a..b], g)
            })
        };
        // SAFETY: `for_runs` splits each chunk into consecutive runs, and `kernel::forward`
        // writes each run zipped with the input run of its length (the slice panics if
        // shorter): every chunk whole.
        let y = unsafe { crate::host::alloc_fill(x.len(), fill) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        zp: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = host_f32(scale).map_err(candle_core::Error::wrap)?;
        let z = host_f32(zp).map_err(candle_core::Error::wrap)?;
        let grids = self.lsq_grids(&s, &z);
        let dy = dy.to_dtype(DType::F32)?.contiguous()?;
        let inner: usize = match self.axis {
            Some(a) => x.dims()[a + 1..].iter().product(),
            None => x.elem_count(),
        };
        let res = with_cpu_f32(x, |xs| {
            with_cpu_f32(&dy, |dys| lsq_backward_host(xs, dys, &grids, inner))
        })
        .flatten();
        let Some((dx, sums)) = res else {
            candle_core::bail!("{}: backward needs contiguous f32 CPU tensors", self.name())
        };
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let ds: Vec<f32> = sums.iter().map(|s| s.scale as f32).collect();
        let dz: Vec<f32> = sums.iter().map(|s| s.zero_point as f32).collect();
        let ds = Tensor::from_vec(ds, scale.shape(), scale.device())?;
        let dz = Tensor::from_vec(dz, zp.shape(), zp.device())?;
        Ok((Some(dx), Some(ds), Some(dz)))
    }
}

/// One pass over x and dy: dx, and per-grid sums of the scale and zero-point gradients.
fn lsq_backward_host(
    x: &[f32],
    dy: &[f32],
    grids: &[LsqGrid],
    inner: usize,
) -> (Vec<f32>, Vec<LsqSums>) {
    let c = grids.len();
    let inner = inner.max(1);
    let run = |off: usize, x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]| {
        let mut sums = vec![LsqSums::default(); c];
        let mut i = 0;
        while i < x.len() {
            let r = (off + i) / inner;
            let end = ((r + 1) * inner - off).min(x.len());
            sums[r % c] = sums[r % c]
                + kernel::lsq_backward(&x[i..end], &dy[i..end], &mut dx[i..end], grids[r % c]);
            i = end;
        }
        sums
    };
    let n = x.len();
    // dy has x's shape; `lsq_backward` writes the shortest of its three slices.
    assert_eq!(
        dy.len(),
        n,
        "LSQ backward: {} gradients for {n} inputs",
        dy.len()
    );
    let mut sums = Vec::new();
    let fill = |spare: &mut [MaybeUninit<f32>]| {
        sums = if n < 2 * CHUNK {
            run(0, x, dy, spare)
        } else {
            spare
                .par_chunks_mut(CHUNK)
                .enumerate()
                .map(|(k, out)| {
                    let off = k * CHUNK;
                    run(
                        off,
                        &x[off..off + out.len()],
                        &dy[off..off + out.len()],
                        out,
                    )
                })
                // In chunk order, left to right: deterministic whatever rayon's split.
                .collect::<Vec<_>>()
                .into_iter()
                .reduce(|a, b| a.into_iter().zip(b).map(|(a, b)| a + b).collect())
                .unwrap_or_else(|| vec![LsqSums::default(); c])
        };
    };
    // SAFETY: the chunks cover dx (one when small, else `par_chunks_mut`); `run` walks each
    // chunk in consecutive runs to its end and `lsq_backward` writes each run whole, its
    // `x` and `dy` runs having the run's length (dy's length asserted above).
    let dx = unsafe { crate::host::alloc_with(n, fill) };
    (dx, sums)
}

/// Learnable fake quantization (LSQ) of `x` with scale and zero point as tensors (shape `[1]`
/// per tensor, `[C]` along `axis` per channel), usually candle `Var`s being trained. The
/// gradients for scale and zero point are multiplied by `grad_factor`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use qat_core::fake_quant::fake_quantize_learnable;
/// use qat_core::QuantRange;
/// let x = Var::new(&[0.04f32, 0.26, 2.0], &Device::Cpu)?;
/// let scale = Var::new(&[0.1f32], &Device::Cpu)?;
/// let zp = Var::new(&[0.0f32], &Device::Cpu)?;
/// let range = QuantRange::explicit(0, 15)?;
/// let y = fake_quantize_learnable(&x, &scale, &zp, None, &range, 1.0)?;
/// assert_eq!(y.to_vec1::<f32>()?, vec![0.0, 0.3, 1.5]);
/// let grads = y.sum_all()?.backward()?;
/// // 2.0 is clamped: no gradient for x, d scale = qmax - zp = 15 there.
/// assert_eq!(grads.get(&x).unwrap().to_vec1::<f32>()?, vec![1.0, 1.0, 0.0]);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn fake_quantize_learnable(
    x: &Tensor,
    scale: &Tensor,
    zero_point: &Tensor,
    axis: Option<usize>,
    range: &QuantRange,
    grad_factor: f32,
) -> Result<Tensor> {
    check_float_input(x, "fake_quantize_learnable")?;
    let s = host_f32(scale)?;
    let z = host_f32(zero_point)?;
    let channels = match axis {
        Some(a) if a >= x.rank() => {
            return Err(Error::qparams(
                format!(
                    "axis {a} is out of range for a tensor of shape {:?}",
                    x.dims()
                ),
                "use an axis below the tensor's rank",
            ))
        }
        Some(a) => x.dims()[a],
        None => 1,
    };
    if s.len() != channels || z.len() != channels {
        return Err(Error::qparams(
            format!(
                "{} scales and {} zero points, expected {channels}",
                s.len(),
                z.len()
            ),
            "give scale and zero point tensors of shape [1] per tensor or [C] per channel",
        ));
    }
    for &v in &s {
        check_scale(v)?;
    }
    if !z.iter().all(|v| v.is_finite()) {
        return Err(Error::qparams(
            "the zero point is not finite",
            "reinitialise the zero point (it is clamped into the range when used)",
        ));
    }
    if !grad_factor.is_finite() {
        return Err(Error::qparams(
            format!("grad_factor {grad_factor} is not finite"),
            "use a finite grad_factor (1.0, or 1/sqrt(numel * quant_max) for LSQ scaling)",
        ));
    }
    let op = Lsq {
        range: *range,
        axis,
        grad_factor,
    };
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let scale = scale.to_dtype(DType::F32)?.contiguous()?;
        let zp = zero_point.to_dtype(DType::F32)?.contiguous()?;
        return Ok(x.contiguous()?.apply_op3(&scale, &zp, op)?);
    }
    composite(x, scale, zero_point, &op, &s, &z)
}

/// The same values and gradients from candle ops (other devices and dtypes).
fn composite(
    x: &Tensor,
    scale: &Tensor,
    zero_point: &Tensor,
    op: &Lsq,
    s: &[f32],
    z: &[f32],
) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let y = fake_quantize(&xf.detach(), &op.qparams(s, z), &op.range)?;
    // Backward grid (zero point `zb`), as broadcastable tensors.
    let zb = backward_zero_points(z, &op.range, op.axis.is_some());
    let zb_int: Vec<i32> = zb.iter().map(|&v| v as i32).collect();
    let qp_b = match op.axis {
        None => QParams::PerTensor {
            scale: s[0],
            zero_point: zb_int[0],
        },
        Some(axis) => QParams::PerChannel {
            scale: s.to_vec(),
            zero_point: zb_int,
            axis,
        },
    };
    let [st, _inv, lo, hi] = grid_tensors(&xf, &qp_b, &op.range)?;
    // PyTorch adds the zero point before rounding in the backward; the code relative to the
    // zero point is the same integer except in rare near-tie cases, within the tolerance.
    let inv = (st.ones_like()? / &st)?;
    let q = composite_code(&xf.detach(), &inv, &lo, &hi)?;
    let below = q.broadcast_lt(&lo)?.to_dtype(DType::F32)?;
    let above = q.broadcast_gt(&hi)?.to_dtype(DType::F32)?;
    let inside = q.broadcast_ge(&lo)?.mul(&q.broadcast_le(&hi)?)?;
    let zeros = xf.zeros_like()?;
    let xfq_b = q
        .broadcast_maximum(&lo)?
        .broadcast_minimum(&hi)?
        .broadcast_mul(&st)?;
    // d y / d scale per element, and d y / d zero point.
    let ds = ((inside.where_cond(&(xfq_b - &xf.detach())?.broadcast_mul(&inv)?, &zeros)?
        + below.broadcast_mul(&lo)?)?
        + above.broadcast_mul(&hi)?)?;
    let dz = (below + &above)?.broadcast_mul(&st.neg()?)?;
    let gf = op.grad_factor as f64;
    let scale_g = (scale.to_dtype(DType::F32)? * gf)?;
    let zp_g = (zero_point.to_dtype(DType::F32)? * gf)?;
    let shape: Vec<usize> = lo.dims().to_vec();
    let scale_g = scale_g.reshape(shape.as_slice())?;
    let zp_g = zp_g.reshape(shape.as_slice())?;
    let through = ((inside.where_cond(&xf, &zeros)? + ds.detach().broadcast_mul(&scale_g)?)?
        + dz.detach().broadcast_mul(&zp_g)?)?;
    let y = (y + (&through - through.detach())?)?;
    Ok(y.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_quant::kernel::Grid;

    #[test]
    fn zero_point_quirk() {
        let r = QuantRange::explicit(-128, 127).unwrap();
        assert_eq!(forward_zero_points(&[-0.7, 2.5], &r), vec![-1, 2]);
        assert_eq!(
            backward_zero_points(&[-0.7, 2.5], &r, false),
            vec![0.0, 3.0]
        );
        assert_eq!(
            backward_zero_points(&[-0.7, 2.5], &r, true),
            vec![-1.0, 2.0]
        );
    }

    #[test]
    fn grid_builds_match() {
        let g = Grid::new(0.5, 1, 0, 7);
        assert_eq!((g.lo, g.hi), (-1.0, 6.0));
    }
}
