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

/// `max(a + b, 0)`, forward only.
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (slice(as_, al)?, slice(bs, bl)?);
        if a.len() != b.len() {
            candle_core::bail!("add-relu: {} values and {} values", a.len(), b.len());
        }
        let fill = |off: usize, out: &mut [MaybeUninit<f32>]| {
            let n = out.len();
            for ((o, &a), &b) in out.iter_mut().zip(&a[off..off + n]).zip(&b[off..off + n]) {
                o.write((a + b).max(0.0));
            }
        };
        // SAFETY: each chunk is written zipped with runs of `a` and `b` of its length (the
        // slices panic if shorter; `a` and `b` have one length, checked above): whole.
        let out = unsafe { alloc_fill(a.len(), fill) };
        Ok((CpuStorage::F32(out), al.shape().clone()))
    }
}

/// `relu(a + b)` without autograd (a converted model's `add_relu` on dequantized values):
/// for two contiguous CPU f32 tensors of one shape, one pass split on the caller's rayon pool
/// (candle's elementwise ops run two passes on its own pool); candle's broadcasting ops
/// otherwise. The same f32 values either way: one rounded addition, then `max(0)`.
pub(crate) fn add_relu_no_grad(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fits = |x: &Tensor| {
        matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && x.is_contiguous()
    };
    if a.dims() == b.dims() && fits(a) && fits(b) {
        Ok(a.apply_op2_no_bwd(b, &AddRelu)?)
    } else {
        Ok(a.broadcast_add(b)?.relu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn add_relu_matches_candle() {
        for n in [7usize, 3 * crate::host::CHUNK + 5] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 2.0).collect();
            let a = Tensor::from_vec(a, (1, n), &Device::Cpu).unwrap();
            let b = Tensor::from_vec(b, (1, n), &Device::Cpu).unwrap();
            let want = a.broadcast_add(&b).unwrap().relu().unwrap();
            let got = add_relu_no_grad(&a, &b).unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap()
            );
            // Broadcasting goes through candle.
            let row = b.narrow(1, 0, 1).unwrap();
            let got = add_relu_no_grad(&a, &row).unwrap();
            let want = a.broadcast_add(&row).unwrap().relu().unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap()
            );
        }
    }

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
