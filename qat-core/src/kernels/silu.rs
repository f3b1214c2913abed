//! SiLU with a one-pass backward. candle's `silu` backward builds `sigmoid(x) * (1 - y) + y`
//! from six elementwise ops (negate, exp, add, reciprocal, affine, multiply, add), each a
//! fresh activation-sized buffer, then multiplies by the gradient; this computes the same f32
//! operations, in the same order, per element in one pass (the same bits).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Shape, Tensor};

use crate::error::Result;
use crate::host::{alloc_fill, cpu_f32_slice};

/// `x / (1 + exp(-x))`, candle's f32 `silu`.
#[inline(always)]
fn silu_f32(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "qat-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32_slice(s, l, "silu: input")?;
        let fill = |off: usize, out: &mut [MaybeUninit<f32>]| {
            let n = out.len();
            for (o, &v) in out.iter_mut().zip(&x[off..off + n]) {
                o.write(silu_f32(v));
            }
        };
        // SAFETY: each chunk is written zipped with the run of `x` of its length: whole.
        let out = unsafe { alloc_fill(x.len(), fill) };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        Ok(Some(grad.apply_op3_no_bwd(
            &x.contiguous()?,
            &y.contiguous()?,
            &SiluGrad,
        )?))
    }
}

/// `grad * (s * (1 - y) + y)`, `s = 1 / (exp(-x) + 1)`, from the gradient, the input and the
/// output, in candle's operations: `neg`, `exp`, `affine(1, 1)`, `recip`,
/// `affine(-1, 1)`, `mul`, `add`, then `mul`.
struct SiluGrad;

impl CustomOp3 for SiluGrad {
    fn name(&self) -> &'static str {
        "qat-silu-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = cpu_f32_slice(gs, gl, "silu backward: gradient")?;
        let x = cpu_f32_slice(xs, xl, "silu backward: input")?;
        let y = cpu_f32_slice(ys, yl, "silu backward: output")?;
        if x.len() != g.len() || y.len() != g.len() {
            candle_core::bail!(
                "silu backward: {} gradients for {} inputs and {} outputs",
                g.len(),
                x.len(),
                y.len()
            );
        }
        let fill = |off: usize, out: &mut [MaybeUninit<f32>]| {
            let n = out.len();
            let run = g[off..off + n]
                .iter()
                .zip(&x[off..off + n])
                .zip(&y[off..off + n]);
            for (o, ((&g, &x), &y)) in out.iter_mut().zip(run) {
                let s = 1.0 / ((-x).exp() * 1.0 + 1.0);
                let d = s * (-y + 1.0) + y;
                o.write(g * d);
            }
        };
        // SAFETY: each chunk is written zipped with runs of `g`, `x` and `y` of its length
        // (all of `g`'s length, checked above): whole.
        let out = unsafe { alloc_fill(g.len(), fill) };
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// `x * sigmoid(x)`: on CPU f32 tensors with the one-pass backward, elsewhere candle's `silu`
/// (the same values and gradients).
pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
        Ok(x.contiguous()?.apply_op1(Silu)?)
    } else {
        Ok(x.silu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn silu_equals_candles_values_and_gradients_bit_for_bit() {
        let dev = Device::Cpu;
        // Large enough for the parallel chunks, with extremes (exp overflow and underflow).
        let mut v: Vec<f32> = Tensor::randn(0f32, 4., 3 * crate::host::CHUNK + 17, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        v[..6].copy_from_slice(&[0.0, -0.0, 100.0, -100.0, 1e-30, -89.5]);
        let n = v.len();
        let x = Var::from_vec(v, n, &dev).unwrap();
        let r = Tensor::randn(0f32, 1., n, &dev).unwrap();
        let ours = silu(&x).unwrap();
        let theirs = x.silu().unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.to_vec1().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        assert_eq!(bits(&ours), bits(&theirs), "values");
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            bits(g1.get(&x).unwrap()),
            bits(g2.get(&x).unwrap()),
            "gradients"
        );
        // A strided input (transposed) goes through `contiguous` first.
        let m = Var::from_tensor(&Tensor::randn(0f32, 1., (7, 5), &dev).unwrap()).unwrap();
        let a = silu(&m.t().unwrap()).unwrap();
        let b = m.t().unwrap().silu().unwrap();
        assert_eq!(
            bits(&a.flatten_all().unwrap()),
            bits(&b.flatten_all().unwrap())
        );
    }
}
