//! The CPU inner loops of fake quantization: forward, straight-through backward and LSQ
//! backward over f32 slices. Each is one pass over memory, compiled twice (baseline x86-64
//! and AVX2, chosen at run time) and free of libm calls.
//!
//! Rounding is half to even, as `std::nearbyint` in PyTorch: after clamping the value to a
//! small range, adding and subtracting 1.5 * 2^23 rounds it exactly (the f32 sum has no
//! fraction bits left), whatever the target's rounding instructions.

use std::mem::MaybeUninit;

use multiversion::multiversion;

/// 1.5 * 2^23: `(v + MAGIC) - MAGIC` is `v` rounded half to even for |v| < 2^22.
const MAGIC: f32 = 12_582_912.0;

#[inline(always)]
fn clamp(v: f32, lo: f32, hi: f32) -> f32 {
    let v = if v < lo { lo } else { v };
    if v > hi {
        hi
    } else {
        v
    }
}

/// Rounds half to even; exact for |v| < 2^22 (callers clamp first).
#[inline(always)]
pub(crate) fn round_small(v: f32) -> f32 {
    (v + MAGIC) - MAGIC
}

/// One quantization grid: PyTorch's `(clamp(zp + nearbyint(x * inv_scale), qmin, qmax) - zp)
/// * scale`, with the zero point folded into the clamp bounds (`lo = qmin - zp`,
/// `hi = qmax - zp`; all are small integers, so this is exact).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Grid {
    pub scale: f32,
    pub inv_scale: f32,
    pub lo: f32,
    pub hi: f32,
}

impl Grid {
    pub fn new(scale: f32, zero_point: i32, quant_min: i32, quant_max: i32) -> Self {
        Grid {
            scale,
            inv_scale: 1.0 / scale,
            lo: (quant_min - zero_point) as f32,
            hi: (quant_max - zero_point) as f32,
        }
    }

    /// `nearbyint(x / scale)` relative to the zero point, clamped one step outside the range
    /// (enough to tell in-range from out-of-range, small enough to round exactly).
    #[inline(always)]
    pub fn code(&self, x: f32) -> f32 {
        round_small(clamp(x * self.inv_scale, self.lo - 1.0, self.hi + 1.0))
    }

    #[inline(always)]
    pub fn fake_quant(&self, x: f32) -> f32 {
        clamp(self.code(x), self.lo, self.hi) * self.scale
    }

    /// The straight-through mask: whether the unclamped code lies in the range.
    #[inline(always)]
    pub fn in_range(&self, x: f32) -> bool {
        let q = self.code(x);
        q >= self.lo && q <= self.hi
    }
}

/// `y = fake_quant(x)`.
#[multiversion(targets("x86_64+avx2"))]
pub(crate) fn forward(x: &[f32], y: &mut [MaybeUninit<f32>], g: Grid) {
    for (o, &v) in y.iter_mut().zip(x) {
        o.write(g.fake_quant(v));
    }
}

/// `dx = dy * [qmin <= q <= qmax]`.
#[multiversion(targets("x86_64+avx2"))]
pub(crate) fn backward(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], g: Grid) {
    for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
        o.write(if g.in_range(v) { d } else { 0.0 });
    }
}

/// Forward and mask in one pass (mask as 1.0 / 0.0).
#[multiversion(targets("x86_64+avx2"))]
pub(crate) fn forward_with_mask(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    mask: &mut [MaybeUninit<f32>],
    g: Grid,
) {
    for ((o, m), &v) in y.iter_mut().zip(mask.iter_mut()).zip(x) {
        let q = g.code(v);
        m.write(if q >= g.lo && q <= g.hi { 1.0 } else { 0.0 });
        o.write(clamp(q, g.lo, g.hi) * g.scale);
    }
}

/// The grid of one LSQ backward (PyTorch's `_fake_quantize_grad_learnable_*` kernels): the
/// zero point is a float added before rounding, `xq = nearbyint(zp + x * inv_scale)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LsqGrid {
    pub scale: f32,
    pub inv_scale: f32,
    pub zero_point: f32,
    pub quant_min: f32,
    pub quant_max: f32,
    pub grad_factor: f32,
}

/// Sums of the scale and zero-point gradients of a slice.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LsqSums {
    pub scale: f64,
    pub zero_point: f64,
}

impl std::ops::Add for LsqSums {
    type Output = LsqSums;
    fn add(self, o: LsqSums) -> LsqSums {
        LsqSums {
            scale: self.scale + o.scale,
            zero_point: self.zero_point + o.zero_point,
        }
    }
}

/// LSQ backward: writes dx, returns the sums of d scale and d zero point.
#[multiversion(targets("x86_64+avx2"))]
pub(crate) fn lsq_backward(
    x: &[f32],
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
    g: LsqGrid,
) -> LsqSums {
    const LANES: usize = 8;
    let (qmin, qmax, z, s, gf) = (
        g.quant_min,
        g.quant_max,
        g.zero_point,
        g.scale,
        g.grad_factor,
    );
    let small = qmin - z;
    let big = qmax - z;
    let mut ds = [0.0f32; LANES];
    let mut dz = [0.0f32; LANES];
    let mut total = LsqSums::default();
    let mut lane = 0;
    for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
        let xq = round_small(clamp(z + v * g.inv_scale, qmin - 1.0, qmax + 1.0));
        let below = xq < qmin;
        let above = xq > qmax;
        let xfq = (clamp(xq, qmin, qmax) - z) * s;
        let in_scale = d * (xfq - v) * g.inv_scale * gf;
        let out_scale = d * (if below { small } else { big }) * gf;
        let out = below || above;
        o.write(if out { 0.0 } else { d });
        ds[lane] += if out { out_scale } else { in_scale };
        dz[lane] += if out { -d * s * gf } else { 0.0 };
        lane += 1;
        if lane == LANES {
            lane = 0;
        }
    }
    for i in 0..LANES {
        total.scale += ds[i] as f64;
        total.zero_point += dz[i] as f64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_rounding_is_half_even() {
        for (v, r) in [
            (0.5f32, 0.0f32),
            (1.5, 2.0),
            (2.5, 2.0),
            (-0.5, 0.0),
            (-1.5, -2.0),
            (-2.5, -2.0),
            (0.49999997, 0.0),
            (127.5, 128.0),
            (-127.5, -128.0),
            (3.2, 3.0),
        ] {
            assert_eq!(round_small(v), r, "{v}");
            assert_eq!(round_small(v), v.round_ties_even());
        }
    }

    #[test]
    fn grid_matches_scalar_definition() {
        let g = Grid::new(0.1, 3, 0, 15);
        for i in -300..300 {
            let x = i as f32 * 0.0137;
            let q = (3.0 + (x * (1.0f32 / 0.1)).round_ties_even()) as i64;
            let want = ((q.clamp(0, 15) - 3) as f32) * 0.1;
            assert_eq!(g.fake_quant(x), want, "{x}");
            assert_eq!(g.in_range(x), (0..=15).contains(&q), "{x}");
        }
    }
}
