//! SiLU with a one-pass backward. candle's `silu` backward builds `sigmoid(x) * (1 - y) + y`
//! from six elementwise ops (negate, exp, add, reciprocal, affine, multiply, add), each a
//! fresh activation-sized buffer, then multiplies by the gradient; this computes the same f32
//! operations, in the same order, per element in one pass (the same bits). The gated form
//! ([`silu_gated`], SwiGLU's `silu(gate) * up`) fuses the product too: one pass forward, one
//! pass for both gradients, the bits of `silu(gate) * up` through candle's autograd.

use std::mem::MaybeUninit;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor,
};

use crate::error::Result;
use rayon::prelude::*;

use crate::host::{alloc_fill, alloc_with, cpu_f32_slice, CHUNK};

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

/// `silu(gate) * up` (elementwise, one shape).
struct SiluGated;

impl CustomOp2 for SiluGated {
    fn name(&self) -> &'static str {
        "qat-silu-gated"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = cpu_f32_slice(gs, gl, "gated silu: gate")?;
        let u = cpu_f32_slice(us, ul, "gated silu: up")?;
        if g.len() != u.len() {
            candle_core::bail!("gated silu: {} gates for {} up values", g.len(), u.len());
        }
        let fill = |off: usize, out: &mut [MaybeUninit<f32>]| {
            let n = out.len();
            let run = g[off..off + n].iter().zip(&u[off..off + n]);
            for (o, (&g, &u)) in out.iter_mut().zip(run) {
                o.write(silu_f32(g) * u);
            }
        };
        // SAFETY: each chunk is written zipped with runs of `g` and `u` of its length (one
        // length, checked above): whole.
        let out = unsafe { alloc_fill(g.len(), fill) };
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let both = grad.apply_op3_no_bwd(gate, up, &SiluGatedGrad)?;
        let (dg, du) = (both.get(0)?, both.get(1)?);
        Ok((gate.track_op().then_some(dg), up.track_op().then_some(du)))
    }
}

/// Both gradients of `silu(gate) * up` in one pass, stacked `[d gate, d up]`: candle's
/// `mul` backward (`grad * up`, `grad * silu(gate)`), then its `silu` backward on the first.
struct SiluGatedGrad;

impl CustomOp3 for SiluGatedGrad {
    fn name(&self) -> &'static str {
        "qat-silu-gated-grad"
    }

    fn cpu_fwd(
        &self,
        ds: &CpuStorage,
        dl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = cpu_f32_slice(ds, dl, "gated silu backward: gradient")?;
        let g = cpu_f32_slice(gs, gl, "gated silu backward: gate")?;
        let u = cpu_f32_slice(us, ul, "gated silu backward: up")?;
        let n = d.len();
        if g.len() != n || u.len() != n {
            candle_core::bail!(
                "gated silu backward: {n} gradients for {} gates and {} up values",
                g.len(),
                u.len()
            );
        }
        // Element `i` of both halves at once (`exp(-x)` once: `silu_f32`'s and the sigmoid's
        // are the same value): d gate at `i`, d up at `n + i`.
        let grads = |off: usize, dg: &mut [MaybeUninit<f32>], du: &mut [MaybeUninit<f32>]| {
            for (k, (a, b)) in dg.iter_mut().zip(du.iter_mut()).enumerate() {
                let i = off + k;
                let x = g[i];
                let e = (-x).exp();
                let y = x / (1.0 + e);
                let s = 1.0 / (e * 1.0 + 1.0);
                a.write((d[i] * u[i]) * (s * (-y + 1.0) + y));
                b.write(d[i] * y);
            }
        };
        let fill = |out: &mut [MaybeUninit<f32>]| {
            let (dg, du) = out.split_at_mut(n);
            if n < 2 * CHUNK {
                grads(0, dg, du);
            } else {
                dg.par_chunks_mut(CHUNK)
                    .zip(du.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(c, (a, b))| grads(c * CHUNK, a, b));
            }
        };
        // SAFETY: `out` holds `2 n` elements, split into halves of `n`; `grads` writes every
        // element of the pairs of equal-length chunks it is given (`par_chunks_mut` of two
        // slices of one length pair up whole), so both halves are written whole.
        let out = unsafe { alloc_with(2 * n, fill) };
        let mut dims = vec![2];
        dims.extend_from_slice(dl.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Whether [`silu_gated`] takes these tensors: CPU f32, one shape.
pub(crate) fn silu_gated_fits(gate: &Tensor, up: &Tensor) -> bool {
    let fits = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32;
    fits(gate) && fits(up) && gate.dims() == up.dims()
}

/// `silu(gate) * up` on two CPU f32 tensors of one shape, fused forward and backward (the
/// values and gradients of `silu(gate) * up` through candle, bit for bit); `None` when the
/// tensors do not fit ([`silu_gated_fits`]; the caller composes the two ops).
pub(crate) fn silu_gated(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !silu_gated_fits(gate, up) {
        return Ok(None);
    }
    Ok(Some(
        gate.contiguous()?.apply_op2(&up.contiguous()?, SiluGated)?,
    ))
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
    use crate::kernels::{assert_same_bits, bits};
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
        let ours = silu(&x).unwrap();
        let theirs = x.silu().unwrap();
        assert_same_bits("silu", &ours, &theirs, &[("x", &x)]);
        // A strided input (transposed) goes through `contiguous` first.
        let m = Var::from_tensor(&Tensor::randn(0f32, 1., (7, 5), &dev).unwrap()).unwrap();
        let a = silu(&m.t().unwrap()).unwrap();
        let b = m.t().unwrap().silu().unwrap();
        assert_eq!(
            bits(&a.flatten_all().unwrap()),
            bits(&b.flatten_all().unwrap())
        );
    }

    #[test]
    fn gated_silu_equals_candles_silu_times_up_values_and_gradients_bit_for_bit() {
        let dev = Device::Cpu;
        // Sizes below, at and across the parallel chunking (the stacked gradient's chunks
        // straddle the two halves when n is not a multiple of CHUNK).
        for n in [37, crate::host::CHUNK, 3 * crate::host::CHUNK + 17] {
            let g = Var::from_tensor(&Tensor::randn(0f32, 4., (n, 1), &dev).unwrap()).unwrap();
            let u = Var::from_tensor(&Tensor::randn(0f32, 1., (n, 1), &dev).unwrap()).unwrap();
            let ours = silu_gated(&g, &u).unwrap().unwrap();
            let theirs = (g.silu().unwrap() * u.as_tensor()).unwrap();
            let what = format!("gated silu, n = {n}");
            assert_same_bits(&what, &ours, &theirs, &[("gate", &g), ("up", &u)]);
        }
        // A constant `up` gets no gradient; shapes that differ are left to the caller.
        let g = Var::from_tensor(&Tensor::randn(0f32, 1., 8, &dev).unwrap()).unwrap();
        let c = Tensor::ones(8, DType::F32, &dev).unwrap();
        let y = silu_gated(&g, &c).unwrap().unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&g).is_some() && grads.get(&c).is_none());
        let other = Tensor::ones(4, DType::F32, &dev).unwrap();
        assert!(silu_gated(&g, &other).unwrap().is_none());
    }
}
