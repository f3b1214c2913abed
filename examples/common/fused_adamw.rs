//! `candle_nn::AdamW` in one pass per parameter: the same update, value for value (the
//! same f32 operations in the same order, the constants rounded from f64 as candle's
//! `affine` rounds them), without the ~15 temporary tensors candle's version builds per
//! parameter per step. The parameter is updated in place (a candle `InplaceOp2` on the
//! variable's storage, the gradient as source); the moments live in plain vectors; large
//! parameters are split over rayon's pool (elementwise, so the result does not depend on
//! the split).
//!
//! candle's step (candle-nn 0.11.1 `optim.rs`), with `t` counted once per step:
//! `m = m b1 + g (1 - b1)`, `v = v b2 + g² (1 - b2)`, `m̂ = m / (1 - b1^t)`,
//! `v̂ = v / (1 - b2^t)`, `θ = θ (1 - lr wd) - lr m̂ / (sqrt(v̂) + eps)`, each scalar product
//! an `affine(x, c, 0)` (`x * c + 0` in f32).
#![allow(dead_code)]

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 16 * 1024;

/// AdamW over f32 CPU variables, equal to `candle_nn::AdamW` step for step.
pub struct FusedAdamW {
    vars: Vec<(Var, Vec<f32>, Vec<f32>)>,
    params: ParamsAdamW,
    step_t: usize,
}

/// The per-step constants, as f32 (candle's `T::from_f64` of each f64 constant).
#[derive(Clone, Copy)]
struct Consts {
    b1: f32,
    c1: f32,
    b2: f32,
    c2: f32,
    scale_m: f32,
    scale_v: f32,
    eps: f32,
    decay: f32,
    lr: f32,
}

impl Consts {
    #[inline(always)]
    fn update(&self, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((t, m), v), &g) in theta.iter_mut().zip(m).zip(v).zip(g) {
            let nm = (*m * self.b1 + 0.0) + (g * self.c1 + 0.0);
            let nv = (*v * self.b2 + 0.0) + ((g * g) * self.c2 + 0.0);
            let m_hat = nm * self.scale_m + 0.0;
            let v_hat = nv * self.scale_v + 0.0;
            let adjusted = m_hat / (v_hat.sqrt() * 1.0 + self.eps);
            *t = (*t * self.decay + 0.0) - (adjusted * self.lr + 0.0);
            *m = nm;
            *v = nv;
        }
    }
}

/// The in-place update of one parameter: `s1` the parameter, `s2` its gradient.
struct Update<'a> {
    k: Consts,
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("FusedAdamW: parameters and gradients must be f32");
        };
        let (Some((t0, t1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("FusedAdamW: the parameter and its gradient must be contiguous");
        };
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        let n = t1 - t0;
        if g1 - g0 != n || m.len() != n || v.len() != n {
            candle_core::bail!(
                "FusedAdamW: parameter of {n} values, gradient of {}, moments of {}",
                g1 - g0,
                m.len()
            );
        }
        let (theta, g) = (&mut theta[t0..t1], &g[g0..g1]);
        let k = self.k;
        if n <= CHUNK {
            k.update(theta, &mut m, &mut v, g);
        } else {
            theta
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((t, m), v), g)| k.update(t, m, v, g));
        }
        Ok(())
    }
}

impl Optimizer for FusedAdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> candle_core::Result<Self> {
        let vars = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|var| {
                if var.dtype() != candle_core::DType::F32 || !var.device().is_cpu() {
                    candle_core::bail!(
                        "FusedAdamW takes f32 CPU variables; got {:?} on {:?} (use \
                         candle_nn::AdamW)",
                        var.dtype(),
                        var.device()
                    );
                }
                let n = var.elem_count();
                Ok((var, vec![0f32; n], vec![0f32; n]))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(FusedAdamW {
            vars,
            params,
            step_t: 0,
        })
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let k = Consts {
            b1: p.beta1 as f32,
            c1: (1.0 - p.beta1) as f32,
            b2: p.beta2 as f32,
            c2: (1.0 - p.beta2) as f32,
            scale_m: (1f64 / (1f64 - p.beta1.powi(self.step_t as i32))) as f32,
            scale_v: (1f64 / (1f64 - p.beta2.powi(self.step_t as i32))) as f32,
            eps: p.eps as f32,
            decay: (1f64 - p.lr * p.weight_decay) as f32,
            lr: p.lr as f32,
        };
        for (var, m, v) in self.vars.iter_mut() {
            let Some(g) = grads.get(var) else { continue };
            let g: Tensor = if g.is_contiguous() {
                g.clone()
            } else {
                g.contiguous()?
            };
            let op = Update {
                k,
                m: RefCell::new(m.as_mut_slice()),
                v: RefCell::new(v.as_mut_slice()),
            };
            var.as_tensor().inplace_op2(&g, &op)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr
    }
}
