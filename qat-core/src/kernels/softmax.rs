//! Softmax over the last dim as a candle `CustomOp1` with a backward. candle's fused
//! `candle_nn::ops::softmax_last_dim` has none (its output is cut from the graph), and its
//! differentiable `softmax` builds five ops forward and more backward.
//!
//! Arithmetic (f32, per row): `m = max(x)`, `e = exp(x - m)`, `y = e / sum(e)` with the sum
//! in the order of candle's `softmax_last_dim` CPU kernel ([`row_sum`]), so the two are equal
//! bit for bit on x86-64; `-inf` entries (masked positions) give 0. Backward from the
//! output: `dx = y * (dy - dot(dy, y))`.
//!
//! The causal form ([`causal_softmax_last_dim`]) is attention's `softmax(mask(x * scale))` in
//! one op: the scores scaled as candle's `affine(scale, 0)` scales them, the positions after
//! each query's own (the causal mask) set to `-inf`, then the softmax above; its backward is
//! the three ops' chain (`y * (dy - dot(dy, y))`, 0 where masked, then `* scale + 0`), so the
//! values and gradients are those of the composite, bit for bit, without its two extra
//! activation-sized ops and their gradient buffers.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::host::{alloc_with, cpu_f32_slice, CHUNK};

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

/// The sum of a row as candle's `softmax_last_dim` takes it (`candle_core::cpu::vec_sum`): on
/// x86-64 with AVX2, 32 running sums (4 vectors of 8 lanes) over the whole blocks of 32,
/// combined as candle's AVX `vec_reduce` combines them, then the rest in order; elsewhere
/// in order from 0 (candle's scalar path; its NEON path on ARM sums in yet another order).
fn row_sum(v: &[f32], avx2: bool) -> f32 {
    if !avx2 {
        return v.iter().fold(0f32, |a, &x| a + x);
    }
    let np = v.len() & !31;
    let mut s = [0f32; 32];
    for c in v[..np].chunks_exact(32) {
        for (a, x) in s.iter_mut().zip(c) {
            *a += x;
        }
    }
    // vectors x_j = s[8j..8j+8]: x0 + x1, x2 + x3, then their sum.
    let x: [f32; 8] = std::array::from_fn(|l| (s[l] + s[8 + l]) + (s[16 + l] + s[24 + l]));
    // The two 128-bit halves added, then two horizontal adds.
    let t0: [f32; 4] = std::array::from_fn(|l| x[l] + x[4 + l]);
    let mut b = (t0[0] + t0[1]) + (t0[2] + t0[3]);
    for &y in &v[np..] {
        b += y;
    }
    b
}

/// Whether candle's CPU kernels take their AVX2 paths here.
fn candle_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
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
        let avx2 = candle_avx2();
        y.par_chunks_mut(per_task(d))
            .zip(x.par_chunks(per_task(d)))
            .for_each(|(ys, xs)| {
                for (yr, xr) in ys.chunks_mut(d).zip(xs.chunks(d)) {
                    softmax_row(yr, xr, avx2);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let dy = dy.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let op = SoftmaxBackward { scale: None };
        Ok(Some(y.contiguous()?.apply_op2(&dy, op)?))
    }
}

/// `y * (dy - dot(dy, y))` per row, from the forward's output `y` and the gradient `dy`;
/// with a `scale`, then `* scale + 0.0` (`affine`'s backward, the causal form: masked entries,
/// `y = 0`, give +0.0 as the composite's zeros do).
struct SoftmaxBackward {
    scale: Option<f32>,
}

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
        let fill = |dx: &mut [MaybeUninit<f32>]| {
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
                            let v = yv * (gv - dot);
                            o.write(match self.scale {
                                Some(s) => v * s + 0.0,
                                None => v,
                            });
                        }
                    }
                });
        };
        // SAFETY: `dx` has `y.len()` elements, and `y` and `g` have that many (checked
        // above); the three are cut into chunks of the same length (`per_task(d)`, whole
        // rows), zipped whole, and every element of each chunk is written once (a row of
        // `dx` zips with a row of `y` of the same length).
        let dx = unsafe { alloc_with(y.len(), fill) };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Per row of a `(rows, d)` block: `m = max`, `e = exp(v - m)`, divided by their sum in
/// candle's order. `xr` and `yr` of length `d`; the first `keep` entries of `xr` are the
/// row's (scaled) scores, the rest masked (`-inf` inputs: they give 0).
#[inline]
fn softmax_row(yr: &mut [f32], xr: &[f32], avx2: bool) {
    let m = xr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for (o, &v) in yr.iter_mut().zip(xr) {
        *o = (v - m).exp();
    }
    let sum = row_sum(yr, avx2);
    for o in yr.iter_mut() {
        *o /= sum;
    }
}

/// `softmax(causal_mask(x * scale))` over the last dim of `(..., t, s)` scores, `s >= t`:
/// row `i` of each `t x s` matrix keeps columns `0..=i + s - t` (the queries are the last
/// `t` of `s` positions).
struct CausalSoftmax {
    /// The f32 factor candle's `affine(scale, 0.)` multiplies by.
    scale: f32,
}

/// `(t, s)`, the last two dims, checked (`s >= t >= 1`).
fn causal_dims(shape: &[usize]) -> candle_core::Result<(usize, usize)> {
    match shape {
        [.., t, s] if *t >= 1 && s >= t => Ok((*t, *s)),
        _ => candle_core::bail!(
            "causal softmax: the scores need shape (..., queries, keys) with keys >= queries \
             >= 1, got {shape:?}"
        ),
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "qat-causal-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, d) = causal_dims(l.dims())?;
        let x = cpu_f32_slice(s, l, "causal softmax: scores")?;
        let mut y = vec![0f32; x.len()];
        let (avx2, scale) = (candle_avx2(), self.scale);
        // Tasks of whole rows; a row's query index is its index modulo `t`.
        let per = per_task(d);
        y.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .enumerate()
            .for_each(|(k, (ys, xs))| {
                let mut z = vec![0f32; d];
                let first = k * per / d;
                for (r, (yr, xr)) in ys.chunks_mut(d).zip(xs.chunks(d)).enumerate() {
                    let keep = (first + r) % t + 1 + (d - t);
                    // `affine(scale, 0.)`'s `v * scale + 0.0`, then the mask.
                    for (o, &v) in z[..keep].iter_mut().zip(&xr[..keep]) {
                        *o = v * scale + 0.0;
                    }
                    z[keep..].fill(f32::NEG_INFINITY);
                    softmax_row(yr, &z, avx2);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let dy = dy.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let op = SoftmaxBackward {
            scale: Some(self.scale),
        };
        Ok(Some(y.contiguous()?.apply_op2(&dy, op)?))
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

/// `softmax(causal_mask(x * scale))` over the last dim of `(..., queries, keys)` scores
/// (`keys >= queries`; query `i` sees keys `0..=i + keys - queries`), differentiable: one
/// fused op on CPU f32 (the composite's values and gradients bit for bit), candle's
/// `affine`, `where_cond` and `softmax` elsewhere.
pub(crate) fn causal_softmax_last_dim(x: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (t, s) = causal_dims(x.dims())?;
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op1(CausalSoftmax {
            scale: scale as f32,
        });
    }
    candle_nn::ops::softmax(&causal_masked(x, scale, t, s)?, candle_core::D::Minus1)
}

/// `x * scale` (candle's `affine`) with the positions after each query's own set to `-inf`:
/// the causal softmax's input as the composite computes it (`(t, s)` the last two dims).
fn causal_masked(x: &Tensor, scale: f64, t: usize, s: usize) -> candle_core::Result<Tensor> {
    let z = x.affine(scale, 0.)?;
    let mask: Vec<u8> = (0..t * s)
        .map(|k| u8::from(k % s > k / s + (s - t)))
        .collect();
    let mask = Tensor::from_vec(mask, (t, s), x.device())?.broadcast_as(x.shape())?;
    let ninf = Tensor::new(f32::NEG_INFINITY, x.device())?
        .to_dtype(x.dtype())?
        .broadcast_as(x.shape())?;
    mask.where_cond(&ninf, &z)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_equals_candles_and_its_gradient_the_composite_one() {
        let dev = Device::Cpu;
        // Rows shorter than candle's 32-element blocks, whole blocks, blocks and a tail.
        for d in [13, 64, 77] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 3., (3, 5, d), &dev).unwrap())).unwrap();
            // A causal mask's -inf entries.
            let mask: Vec<u8> = (0..5 * d).map(|i| u8::from(i % d > i / d + 2)).collect();
            let mask = Tensor::from_vec(mask, (5, d), &dev).unwrap();
            let ninf = Tensor::new(f32::NEG_INFINITY, &dev)
                .unwrap()
                .broadcast_as((3, 5, d))
                .unwrap();
            let xm = mask
                .broadcast_as((3, 5, d))
                .unwrap()
                .where_cond(&ninf, &x)
                .unwrap();
            for input in [&xm, x.as_tensor()] {
                let ours = softmax_last_dim(input).unwrap();
                let fast = candle_nn::ops::softmax_last_dim(input).unwrap();
                let a: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = fast.flatten_all().unwrap().to_vec1().unwrap();
                let same = a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
                if cfg!(target_arch = "x86_64") {
                    assert!(same, "row length {d}");
                }
                assert!(a.iter().all(|v| v.is_finite()));
            }
            let ours = softmax_last_dim(&xm).unwrap();
            let slow = candle_nn::ops::softmax(&xm, candle_core::D::Minus1).unwrap();
            crate::kernels::assert_close("softmax", &ours, &slow, 1e-6);
            crate::kernels::assert_same_grads("softmax dx", &ours, &slow, &[("x", &x)], 1e-6);
        }
        assert!(
            softmax_last_dim(&Tensor::zeros((2, 0), candle_core::DType::F32, &dev).unwrap())
                .is_err()
        );
    }

    /// The composite the causal op replaces: `affine`, `where_cond` with a causal mask of
    /// `-inf`, then the softmax kernel above.
    fn composite(x: &Tensor, scale: f64) -> Tensor {
        let (t, s) = causal_dims(x.dims()).unwrap();
        softmax_last_dim(&causal_masked(x, scale, t, s).unwrap()).unwrap()
    }

    #[test]
    fn causal_softmax_equals_the_composite_bit_for_bit_values_and_gradients() {
        let dev = Device::Cpu;
        // Square (training) and more keys than queries (a cache), rows shorter than, equal
        // to and longer than candle's 32-element blocks; enough rows for several tasks.
        for (b, t, s) in [(3, 5, 5), (2, 64, 64), (2, 7, 40), (40, 77, 77)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 3., (b, t, s), &dev).unwrap()).unwrap();
            let scale = 1.0 / 32f64.sqrt();
            let ours = causal_softmax_last_dim(&x, scale).unwrap();
            let theirs = composite(&x, scale);
            let what = format!("causal softmax ({b}, {t}, {s})");
            crate::kernels::assert_same_bits(&what, &ours, &theirs, &[("x", &x)]);
            // Masked positions: exactly 0 out, +0.0 gradient.
            let y: Vec<Vec<f32>> = ours.get(0).unwrap().to_vec2().unwrap();
            assert_eq!(y[0][s - t + 1..], vec![0.0; t - 1][..]);
        }
        for bad in [(2, 5, 4), (2, 0, 3)] {
            let x = Tensor::zeros(bad, candle_core::DType::F32, &dev).unwrap();
            assert!(causal_softmax_last_dim(&x, 1.0).is_err(), "{bad:?}");
        }
    }
}
