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
pub(crate) const MAGIC: f32 = 12_582_912.0;

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
    /// The smallest and largest `x * inv_scale` whose code lies in `[lo, hi]` (see
    /// [`Grid::in_range`]).
    in_lo: f32,
    in_hi: f32,
}

impl Grid {
    pub fn new(scale: f32, zero_point: i32, quant_min: i32, quant_max: i32) -> Self {
        let lo = (quant_min - zero_point) as f32;
        let hi = (quant_max - zero_point) as f32;
        // round_half_even(t) >= lo  <=>  t >= lo - 0.5 when that tie rounds up to lo (lo
        // even), t > lo - 0.5 otherwise; likewise at hi. lo, hi are integers below 2^22, so
        // lo - 0.5 and hi + 0.5 are exact and the strict bounds are their float neighbours.
        let even = |v: f32| v % 2.0 == 0.0;
        let in_lo = if even(lo) {
            lo - 0.5
        } else {
            (lo - 0.5).next_up()
        };
        let in_hi = if even(hi) {
            hi + 0.5
        } else {
            (hi + 0.5).next_down()
        };
        Grid {
            scale,
            inv_scale: 1.0 / scale,
            lo,
            hi,
            in_lo,
            in_hi,
        }
    }

    /// `nearbyint(x / scale)` relative to the zero point, clamped one step outside the range
    /// (enough to tell in-range from out-of-range, small enough to round exactly): the
    /// definition that [`Grid::fake_quant`] and [`Grid::in_range`] are tested against.
    #[cfg(test)]
    pub fn code(&self, x: f32) -> f32 {
        round_small(clamp(x * self.inv_scale, self.lo - 1.0, self.hi + 1.0))
    }

    /// `clamp(code(x), lo, hi) * scale`, computed as `round(clamp(x * inv_scale, lo, hi)) *
    /// scale`: with integer bounds, clamping before rounding gives the same code (rounding is
    /// monotone and keeps integers), and saves two operations per element.
    #[inline(always)]
    pub fn fake_quant(&self, x: f32) -> f32 {
        round_small(clamp(x * self.inv_scale, self.lo, self.hi)) * self.scale
    }

    /// The straight-through mask: whether the unclamped code lies in the range,
    /// `lo <= code(x) <= hi`, as two comparisons of `x * inv_scale` with precomputed bounds
    /// (false for NaN, as the code comparison is).
    #[inline(always)]
    pub fn in_range(&self, x: f32) -> bool {
        let t = x * self.inv_scale;
        t >= self.in_lo && t <= self.in_hi
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
        m.write(if g.in_range(v) { 1.0 } else { 0.0 });
        o.write(g.fake_quant(v));
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
///
/// The sums are accumulated in `LANES` f32 lanes, element `i` of the slice into lane
/// `i % LANES`, and the lanes are added in f64 at the end. The slice is walked in whole
/// groups of `LANES` so that the lanes live in one vector register (the loop vectorises);
/// the tail continues with lane 0, as `i % LANES` does.
#[multiversion(targets("x86_64+avx2"))]
pub(crate) fn lsq_backward(
    x: &[f32],
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
    g: LsqGrid,
) -> LsqSums {
    const LANES: usize = 8;
    let n = x.len().min(dy.len()).min(dx.len());
    let (x, dy, dx) = (&x[..n], &dy[..n], &mut dx[..n]);
    let mut ds = [0.0f32; LANES];
    let mut dz = [0.0f32; LANES];
    let mut xs = x.chunks_exact(LANES);
    let mut dys = dy.chunks_exact(LANES);
    let mut dxs = dx.chunks_exact_mut(LANES);
    for ((o, v), d) in (&mut dxs).zip(&mut xs).zip(&mut dys) {
        for i in 0..LANES {
            let (dxi, dsi, dzi) = lsq_element(v[i], d[i], &g);
            o[i].write(dxi);
            ds[i] += dsi;
            dz[i] += dzi;
        }
    }
    let tail = xs.remainder().iter().zip(dys.remainder());
    for (i, (o, (&v, &d))) in dxs.into_remainder().iter_mut().zip(tail).enumerate() {
        let (dxi, dsi, dzi) = lsq_element(v, d, &g);
        o.write(dxi);
        ds[i] += dsi;
        dz[i] += dzi;
    }
    let mut total = LsqSums::default();
    for i in 0..LANES {
        total.scale += ds[i] as f64;
        total.zero_point += dz[i] as f64;
    }
    total
}

/// One element of the LSQ backward: (dx, d scale, d zero point), the last two already
/// multiplied by the gradient factor.
#[inline(always)]
fn lsq_element(v: f32, d: f32, g: &LsqGrid) -> (f32, f32, f32) {
    let (qmin, qmax, z, s, gf) = (
        g.quant_min,
        g.quant_max,
        g.zero_point,
        g.scale,
        g.grad_factor,
    );
    let xq = round_small(clamp(z + v * g.inv_scale, qmin - 1.0, qmax + 1.0));
    let below = xq < qmin;
    let above = xq > qmax;
    let xfq = (clamp(xq, qmin, qmax) - z) * s;
    let in_scale = d * (xfq - v) * g.inv_scale * gf;
    let out_scale = d * (if below { qmin - z } else { qmax - z }) * gf;
    let out = below || above;
    (
        if out { 0.0 } else { d },
        if out { out_scale } else { in_scale },
        if out { -d * s * gf } else { 0.0 },
    )
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
    fn one_clamp_forward_matches_two_clamps_bitwise() {
        // Ties (k + 0.5 steps), values around the bounds, far outside, signed zeros, NaN.
        for (scale, zp, qmin, qmax) in [(0.1f32, 3, 0, 15), (0.25, 0, -128, 127), (1.0, 7, 0, 7)] {
            let g = Grid::new(scale, zp, qmin, qmax);
            let mut xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.125 * scale).collect();
            xs.extend([
                0.0,
                -0.0,
                1e30,
                -1e30,
                f32::MAX,
                f32::MIN,
                f32::MIN_POSITIVE,
                -1e-30,
            ]);
            xs.extend([f32::INFINITY, f32::NEG_INFINITY]);
            for x in xs {
                let two_clamps = clamp(g.code(x), g.lo, g.hi) * g.scale;
                assert_eq!(g.fake_quant(x).to_bits(), two_clamps.to_bits(), "{x}");
            }
            assert!(g.fake_quant(f32::NAN).is_nan());
        }
    }

    #[test]
    fn in_range_bounds_match_code_bitwise() {
        for (scale, zp, qmin, qmax) in [
            (0.1f32, 3, 0, 15),
            (0.25, 0, -128, 127),
            (1.0, 7, 0, 7),
            (1.0, 0, 0, 255),
            (0.5, -3, -8, 7),
            (1.0, 0, -(1 << 20), 1 << 20),
        ] {
            let g = Grid::new(scale, zp, qmin, qmax);
            let mut ts: Vec<f32> = Vec::new();
            for b in [g.lo, g.hi] {
                for k in -6..=6 {
                    // Around the bound and the ties next to it, with float neighbours.
                    let t = b + k as f32 * 0.25;
                    ts.extend([t, t.next_up(), t.next_down()]);
                }
            }
            ts.extend((-3000..3000).map(|i| i as f32 * 0.0625));
            ts.extend([
                0.0,
                -0.0,
                1e30,
                -1e30,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
            ]);
            for t in ts {
                // Inputs whose `x * inv_scale` is exactly t (scale is a power of two) or close.
                let x = t * scale;
                let q = g.code(x);
                assert_eq!(g.in_range(x), q >= g.lo && q <= g.hi, "t {t}, grid {g:?}");
            }
        }
    }

    /// The LSQ backward element by element, lane `i % 8` as a plain loop: the chunked
    /// kernel must give the same bits.
    fn lsq_reference(x: &[f32], dy: &[f32], g: LsqGrid) -> (Vec<f32>, LsqSums) {
        let mut ds = [0.0f32; 8];
        let mut dz = [0.0f32; 8];
        let mut dx = Vec::new();
        for (i, (&v, &d)) in x.iter().zip(dy).enumerate() {
            let xq = (g.zero_point + v * g.inv_scale)
                .clamp(g.quant_min - 1.0, g.quant_max + 1.0)
                .round_ties_even();
            let (below, above) = (xq < g.quant_min, xq > g.quant_max);
            let xfq = (xq.clamp(g.quant_min, g.quant_max) - g.zero_point) * g.scale;
            if below || above {
                let edge = if below { g.quant_min } else { g.quant_max } - g.zero_point;
                dx.push(0.0);
                ds[i % 8] += d * edge * g.grad_factor;
                dz[i % 8] += -d * g.scale * g.grad_factor;
            } else {
                dx.push(d);
                ds[i % 8] += d * (xfq - v) * g.inv_scale * g.grad_factor;
                dz[i % 8] += 0.0;
            }
        }
        let mut sums = LsqSums::default();
        for i in 0..8 {
            sums.scale += ds[i] as f64;
            sums.zero_point += dz[i] as f64;
        }
        (dx, sums)
    }

    #[test]
    fn lsq_backward_matches_reference_bitwise() {
        let g = LsqGrid {
            scale: 0.03,
            inv_scale: 1.0 / 0.03,
            zero_point: 41.0,
            quant_min: 0.0,
            quant_max: 127.0,
            grad_factor: 0.37,
        };
        let mut s: u32 = 12345;
        let mut next = move || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32
        };
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 100, 1000, 4099] {
            let x: Vec<f32> = (0..n).map(|_| -1.5 + 4.5 * next()).collect();
            let dy: Vec<f32> = (0..n).map(|_| next() - 0.5).collect();
            let mut dx = vec![MaybeUninit::new(f32::NAN); n];
            let sums = lsq_backward(&x, &dy, &mut dx, g);
            let dx: Vec<u32> = dx
                .iter()
                // SAFETY: `dx` was created initialised (NaN) and is only ever written.
                .map(|v| unsafe { v.assume_init() }.to_bits())
                .collect();
            let (want_dx, want) = lsq_reference(&x, &dy, g);
            let want_dx: Vec<u32> = want_dx.iter().map(|v| v.to_bits()).collect();
            assert_eq!(dx, want_dx, "dx, n = {n}");
            assert_eq!(
                sums.scale.to_bits(),
                want.scale.to_bits(),
                "d scale, n = {n}"
            );
            assert_eq!(
                sums.zero_point.to_bits(),
                want.zero_point.to_bits(),
                "d zero point, n = {n}"
            );
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
            let two_clamps = clamp(g.code(x), g.lo, g.hi) * g.scale;
            assert_eq!(g.fake_quant(x).to_bits(), two_clamps.to_bits(), "{x}");
            assert_eq!(g.in_range(x), (0..=15).contains(&q), "{x}");
        }
    }
}
