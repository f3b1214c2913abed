//! The CPU kernel of Q8_K, the type candle's CPU matmul quantizes a K-quant matmul's input
//! into (`BlockQ8K::from_float` in candle 0.11.1's `quantized/k_quants.rs`): per 256 values,
//! `iscale = -127 / max` (`max` the signed largest-|x| value), codes `round(iscale * x)`
//! (half away from zero) clamped to `-128..=127`, scale `d = 1 / iscale` kept in f32; an
//! all-zero block has `d = 0` and codes 0. The value the integer dot product effectively
//! multiplies is `code * d`.

use std::mem::MaybeUninit;

use multiversion::multiversion;

use super::block32::{sat_i8, signed_abs_max};

/// Values per block.
pub(crate) const QK_K: usize = 256;

struct Q8K {
    iscale: f32,
    d: f32,
}

impl Q8K {
    #[inline(always)]
    fn new(xs: &[f32]) -> Self {
        let max = signed_abs_max(xs);
        if max == 0.0 {
            // candle: d = 0, every code 0 (iscale unused; 0 keeps the mask all-pass).
            return Q8K {
                iscale: 0.0,
                d: 0.0,
            };
        }
        let iscale = -127f32 / max;
        Q8K {
            iscale,
            d: 1.0 / iscale,
        }
    }

    #[inline(always)]
    fn value(&self, x: f32) -> f32 {
        // candle: `v.clamp(-128., 127.) as i8` (NaN stays NaN, cast to 0).
        sat_i8((self.iscale * x).round()) * self.d
    }

    #[inline(always)]
    fn in_range(&self, x: f32) -> bool {
        let v = (self.iscale * x).round();
        (-128.0..=127.0).contains(&v)
    }
}

/// `y = code * d` per element; `x.len()` a multiple of 256.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
pub(crate) fn forward(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(QK_K)) {
        let b = Q8K::new(xb);
        for (o, &v) in yb.iter_mut().zip(xb) {
            o.write(b.value(v));
        }
    }
}

/// The straight-through backward: `dx = dy` where the code was not clamped, else 0.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
pub(crate) fn backward(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
    for ((xb, db), ob) in x
        .chunks_exact(QK_K)
        .zip(dy.chunks_exact(QK_K))
        .zip(dx.chunks_exact_mut(QK_K))
    {
        let b = Q8K::new(xb);
        for ((o, &v), &d) in ob.iter_mut().zip(xb).zip(db) {
            o.write(if b.in_range(v) { d } else { 0.0 });
        }
    }
}
