//! Softmax over the last dim as a candle `CustomOp1` with a backward. candle's fused
//! `candle_nn::ops::softmax_last_dim` has none (its output is cut from the graph), and its
//! differentiable `softmax` builds five ops forward and more backward.
//!
//! Arithmetic (f32, per row): `m = max(x)`, `e = exp(x - m)`, `y = e / sum(e)` with the sum
//! taken in order, as candle's `softmax_last_dim` CPU kernel (equal bit for bit); `-inf`
//! entries (masked positions) give 0. Backward from the output: `dx = y * (dy - dot(dy, y))`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::host::{cpu_f32_slice, CHUNK};

/// Rows of length `d` per rayon task: about [`CHUNK`] elements.
fn per_task(d: usize) -> usize {
    (CHUNK / d).max(1) * d
}

fn last_dim(shape: &[usize]) -> candle_core::Result<usize> {
    match shape.last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("softmax: the input needs a non-empty last dim, got {shape:?}"),
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "qat-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = last_dim(l.dims())?;
        let x = cpu_f32_slice(s, l, "softmax: input")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(per_task(d))
            .zip(x.par_chunks(per_task(d)))
            .for_each(|(ys, xs)| {
                for (yr, xr) in ys.chunks_mut(d).zip(xs.chunks(d)) {
                    let m = xr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let mut sum = 0f32;
                    for (o, &v) in yr.iter_mut().zip(xr) {
                        *o = (v - m).exp();
                        sum += *o;
                    }
                    for o in yr.iter_mut() {
                        *o /= sum;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let dy = dy.to_dtype(candle_core::DType::F32)?.contiguous()?;
        Ok(Some(y.contiguous()?.apply_op2(&dy, SoftmaxBackward)?))
    }
}

/// `y * (dy - dot(dy, y))` per row, from the forward's output `y` and the gradient `dy`.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "qat-softmax-last-dim-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = last_dim(l1.dims())?;
        let y = cpu_f32_slice(s1, l1, "softmax backward: output")?;
        let g = cpu_f32_slice(s2, l2, "softmax backward: gradient")?;
        if y.len() != g.len() {
            candle_core::bail!(
                "softmax backward: {} outputs, {} gradients",
                y.len(),
                g.len()
            );
        }
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(per_task(d))
            .zip(y.par_chunks(per_task(d)).zip(g.par_chunks(per_task(d))))
            .for_each(|(os, (ys, gs))| {
                for ((or, yr), gr) in os.chunks_mut(d).zip(ys.chunks(d)).zip(gs.chunks(d)) {
                    let mut acc = [0f32; 8];
                    let (mut yi, mut gi) = (yr.chunks_exact(8), gr.chunks_exact(8));
                    for (a, b) in (&mut yi).zip(&mut gi) {
                        for k in 0..8 {
                            acc[k] += a[k] * b[k];
                        }
                    }
                    let tail: f32 = yi
                        .remainder()
                        .iter()
                        .zip(gi.remainder())
                        .map(|(a, b)| a * b)
                        .sum();
                    let dot = acc.iter().sum::<f32>() + tail;
                    for ((o, &yv), &gv) in or.iter_mut().zip(yr).zip(gr) {
                        *o = yv * (gv - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over the last dim, differentiable: the fused kernel on CPU f32, candle's
/// composite `softmax` elsewhere.
pub(crate) fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, candle_core::D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_equals_candles_and_its_gradient_the_composite_one() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3., (3, 5, 13), &dev).unwrap())).unwrap();
        // A causal mask's -inf entries.
        let mask: Vec<u8> = (0..5 * 13).map(|i| u8::from(i % 13 > i / 13 + 2)).collect();
        let mask = Tensor::from_vec(mask, (5, 13), &dev).unwrap();
        let ninf = Tensor::new(f32::NEG_INFINITY, &dev)
            .unwrap()
            .broadcast_as((3, 5, 13))
            .unwrap();
        let xm = mask
            .broadcast_as((3, 5, 13))
            .unwrap()
            .where_cond(&ninf, &x)
            .unwrap();
        let ours = softmax_last_dim(&xm).unwrap();
        let fast = candle_nn::ops::softmax_last_dim(&xm).unwrap();
        let a: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = fast.flatten_all().unwrap().to_vec1().unwrap();
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        assert!(a.iter().all(|v| v.is_finite()));
        let slow = candle_nn::ops::softmax(&xm, candle_core::D::Minus1).unwrap();
        crate::kernels::assert_same_grads("softmax dx", &ours, &slow, &[("x", &x)], 1e-6);
        assert!(
            softmax_last_dim(&Tensor::zeros((2, 0), candle_core::DType::F32, &dev).unwrap())
                .is_err()
        );
    }
}
