//! ReLU with a one-pass backward: `grad * (y > 0)` read straight from the output, as
//! PyTorch's `threshold_backward`. candle's ReLU backward builds the mask with a comparison,
//! a dtype cast and a multiply, three passes and two fresh buffers per activation.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};

use crate::error::Result;
use crate::host::{alloc_fill, cpu_f32_slice};

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    cpu_f32_slice(s, l, "relu")
}

/// `f` over `x` into a new vector, in parallel chunks when large.
///
/// # Safety
/// `f(x, out)` must initialise every element of `out` (given an `x` of the same length).
unsafe fn map(x: &[f32], f: impl Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    // SAFETY: each chunk `out` comes with the input run of its length, and `f` initialises
    // all of `out` (this function's contract).
    unsafe { alloc_fill(x.len(), |off, out| f(&x[off..off + out.len()], out)) }
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let relu = |x: &[f32], o: &mut [MaybeUninit<f32>]| {
            for (o, &x) in o.iter_mut().zip(x) {
                o.write(x.max(0.0));
            }
        };
        // SAFETY: `relu` writes `o` zipped with an `x` of its length: whole.
        let out = unsafe { map(slice(s, l)?, relu) };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(grad.apply_op2_no_bwd(y, &ReluGrad)?))
    }
}

/// `grad * (y > 0)`.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, y) = (slice(gs, gl)?, slice(ys, yl)?);
        if g.len() != y.len() {
            candle_core::bail!("relu-grad: {} gradients for {} outputs", g.len(), y.len());
        }
        let fill = |off: usize, out: &mut [MaybeUninit<f32>]| {
            let n = out.len();
            for ((o, &g), &y) in out.iter_mut().zip(&g[off..off + n]).zip(&y[off..off + n]) {
                o.write(if y > 0.0 { g } else { 0.0 });
            }
        };
        // SAFETY: each chunk is written zipped with runs of `g` and `y` of its length (the
        // slices panic if shorter; `g` and `y` have one length, checked above): whole.
        let out = unsafe { alloc_fill(g.len(), fill) };
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// `max(x, 0)`; on contiguous CPU f32 tensors with the one-pass backward, elsewhere candle's.
pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && x.is_contiguous() {
        Ok(x.apply_op1(Relu)?)
    } else {
        Ok(x.relu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Values and gradients equal candle's away from 0, and PyTorch's at 0 (no gradient).
    #[test]
    fn matches_candle_and_pytorch_at_zero() {
        for n in [5usize, 3 * crate::host::CHUNK + 7] {
            let v: Vec<f32> = (0..n)
                .map(|i| match i % 4 {
                    0 => 0.0,
                    1 => -(i as f32) / 7.0,
                    _ => i as f32 / 3.0,
                })
                .collect();
            let x = Var::from_vec(v.clone(), n, &Device::Cpu).unwrap();
            let w = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
            let ours = relu(x.as_tensor()).unwrap();
            let theirs = x.as_tensor().relu().unwrap();
            assert_eq!(
                ours.to_vec1::<f32>().unwrap(),
                theirs.to_vec1::<f32>().unwrap()
            );
            let g = ours.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            let got = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            for (i, (&gi, &vi)) in got.iter().zip(&v).enumerate() {
                let want = if vi > 0.0 { i as f32 } else { 0.0 };
                assert_eq!(gi, want, "element {i} of {n}");
            }
        }
    }
}
