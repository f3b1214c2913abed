//! Property tests (proptest) of the fake-quant ops and the min/max observers.
//!
//! * `fq(fq(x)) == fq(x)`, bit for bit;
//! * `|fq(x) - x| <= scale / 2` inside the representable range;
//! * every output lies on the grid `k * scale`, `k` in `[qmin - zp, qmax - zp]`;
//! * exact ties round half to even, and outputs equal PyTorch's formula element by element;
//! * per-channel equals per-tensor on each slice;
//! * the fused CPU op equals the composite op (values and gradients);
//! * the gradient is the straight-through mask;
//! * observers: running extremes, the moving-average recurrence, per-channel equals
//!   per-tensor on each slice;
//! * f16 / bf16 inputs give the f32 result of the converted input, converted back.

use std::ops::RangeInclusive;

use candle_core::{DType, Device, Tensor, Var};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use qat_core::fake_quant::{
    fake_quantize, fake_quantize_composite, fake_quantize_per_channel, fake_quantize_per_tensor,
};
use qat_core::observer::{MinMaxObserver, Observer, ObserverConfig};
use qat_core::{QDType, QParams, QScheme, QuantRange};

const CASES: u32 = 64;

// ---------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------

/// One per-tensor quantization grid.
#[derive(Clone, Copy, Debug)]
struct G {
    range: QuantRange,
    scale: f32,
    zp: i32,
}

impl G {
    fn qmin(&self) -> i32 {
        self.range.quant_min()
    }
    fn qmax(&self) -> i32 {
        self.range.quant_max()
    }
    /// Lowest code relative to the zero point.
    fn lo(&self) -> i32 {
        self.qmin() - self.zp
    }
    /// Highest code relative to the zero point.
    fn hi(&self) -> i32 {
        self.qmax() - self.zp
    }
    fn qparams(&self) -> QParams {
        QParams::PerTensor {
            scale: self.scale,
            zero_point: self.zp,
        }
    }
}

/// 8-bit signed/unsigned ranges (often), narrower widths 2..8, each with or without
/// reduce_range.
fn range_strategy() -> impl Strategy<Value = QuantRange> {
    prop_oneof![
        (Just(8u8), any::<bool>(), any::<bool>()),
        (2u8..8, any::<bool>(), any::<bool>()),
    ]
    .prop_map(|(bits, signed, reduce)| {
        QuantRange::new(QDType::new(bits, signed).unwrap(), None, reduce).unwrap()
    })
}

/// Log-uniform in [1e-4, 10], plus powers of two (for which ties are exact).
fn scale_strategy() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => (-4.0f64..=1.0).prop_map(|e| (10f64.powf(e) as f32).clamp(1e-4, 10.0)),
        1 => (-13i32..=3).prop_map(|e| 2f32.powi(e)),
    ]
}

fn zp_in(range: &QuantRange, i: Index) -> i32 {
    let n = (range.quant_max() - range.quant_min() + 1) as usize;
    range.quant_min() + i.index(n) as i32
}

fn grid() -> impl Strategy<Value = G> {
    (range_strategy(), scale_strategy(), any::<Index>()).prop_map(|(range, scale, i)| G {
        range,
        scale,
        zp: zp_in(&range, i),
    })
}

/// How one input value is made; turned into a value once its grid is known.
#[derive(Clone, Copy, Debug)]
enum XGen {
    /// Uniform over the range (and a few steps beyond).
    Uniform(f64),
    /// `(k + 0.5) * scale` computed in f32: a tie, exact when scale is a power of two.
    Tie(f64),
    /// `k * scale`: a grid point.
    OnGrid(f64),
    /// A raw value: zeros of both signs, or anything in +-1e6.
    Raw(f32),
}

fn xgen() -> impl Strategy<Value = XGen> {
    prop_oneof![
        4 => (0.0f64..1.0).prop_map(XGen::Uniform),
        2 => (0.0f64..1.0).prop_map(XGen::Tie),
        1 => (0.0f64..1.0).prop_map(XGen::OnGrid),
        1 => prop_oneof![Just(0.0f32), Just(-0.0f32), -1e6f32..1e6f32].prop_map(XGen::Raw),
    ]
}

/// The integer of `[a, b]` that `t` in `[0, 1)` points at.
fn pick(t: f64, a: i32, b: i32) -> i32 {
    (a + ((b - a + 1) as f64 * t).floor() as i32).min(b)
}

impl XGen {
    /// A value for grid `g`: inside the representable range `[lo * scale, hi * scale]` when
    /// `inside`, else up to 3 steps beyond it on both sides (and raw values anywhere).
    fn value(self, g: &G, inside: bool) -> f32 {
        let m = if inside { 0 } else { 3 };
        let (lo, hi) = (g.lo() - m, g.hi() + m);
        match self {
            XGen::Uniform(t) => ((lo as f64 + t * (hi - lo) as f64) as f32) * g.scale,
            XGen::Tie(t) => (pick(t, lo, hi - 1) as f32 + 0.5) * g.scale,
            XGen::OnGrid(t) => pick(t, lo, hi) as f32 * g.scale,
            XGen::Raw(v) if inside => v.clamp(g.lo() as f32 * g.scale, g.hi() as f32 * g.scale),
            XGen::Raw(v) => v,
        }
    }
}

fn values(gens: &[XGen], g: &G, inside: bool) -> Vec<f32> {
    gens.iter().map(|x| x.value(g, inside)).collect()
}

/// A small deterministic generator for bulk data (gradients, large tensors).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform(&mut self, a: f32, b: f32) -> f32 {
        a + (b - a) * self.unit() as f32
    }
    fn vec(&mut self, n: usize, a: f32, b: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(a, b)).collect()
    }
}

/// A per-channel case: a 1-4-D tensor, an axis, a range and one (scale, zero point) per
/// channel; every element drawn for its channel's grid.
#[derive(Clone, Debug)]
struct PcCase {
    dims: Vec<usize>,
    axis: usize,
    range: QuantRange,
    scales: Vec<f32>,
    zps: Vec<i32>,
    xs: Vec<f32>,
}

impl PcCase {
    fn channels(&self) -> usize {
        self.dims[self.axis]
    }
    fn grid(&self, c: usize) -> G {
        G {
            range: self.range,
            scale: self.scales[c],
            zp: self.zps[c],
        }
    }
    /// Elements per run of one channel.
    fn inner(&self) -> usize {
        self.dims[self.axis + 1..].iter().product()
    }
    fn channel_of(&self, i: usize) -> usize {
        (i / self.inner()) % self.channels()
    }
    fn tensor(&self) -> Tensor {
        Tensor::from_slice(&self.xs, self.dims.as_slice(), &Device::Cpu).unwrap()
    }
    fn qparams(&self) -> QParams {
        QParams::PerChannel {
            scale: self.scales.clone(),
            zero_point: self.zps.clone(),
            axis: self.axis,
        }
    }
}

fn pc_case(max_dim: usize, rank: RangeInclusive<usize>) -> impl Strategy<Value = PcCase> {
    (
        vec(1usize..=max_dim, rank),
        any::<Index>(),
        range_strategy(),
    )
        .prop_flat_map(|(dims, ai, range)| {
            let axis = ai.index(dims.len());
            let c = dims[axis];
            let n: usize = dims.iter().product();
            (
                Just(dims),
                Just(axis),
                Just(range),
                vec((scale_strategy(), any::<Index>()), c),
                vec(xgen(), n),
            )
        })
        .prop_map(|(dims, axis, range, ch, gens)| {
            let mut case = PcCase {
                dims,
                axis,
                range,
                scales: ch.iter().map(|(s, _)| *s).collect(),
                zps: ch.iter().map(|(_, i)| zp_in(&range, *i)).collect(),
                xs: Vec::new(),
            };
            case.xs = gens
                .iter()
                .enumerate()
                .map(|(i, x)| x.value(&case.grid(case.channel_of(i)), false))
                .collect();
            case
        })
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn t1(xs: &[f32]) -> Tensor {
    Tensor::from_slice(xs, xs.len(), &Device::Cpu).unwrap()
}

/// The values of any float tensor as f32 (exact for f16/bf16), row-major.
fn vals(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    vals(t).into_iter().map(f32::to_bits).collect()
}

/// Per-tensor fake quantization through the public op.
fn fq(x: &Tensor, g: &G) -> Tensor {
    fake_quantize_per_tensor(x, g.scale, g.zp, g.qmin(), g.qmax()).unwrap()
}

/// PyTorch's CPU kernel, element by element:
/// `(clamp(zp + nearbyint(x * inv_scale), qmin, qmax) - zp) * scale` with `inv_scale = 1 / scale`
/// in f32 and the code in int64.
fn torch_fq(x: f32, g: &G) -> f32 {
    let inv = 1.0f32 / g.scale;
    let code = g.zp as i64 + (x * inv).round_ties_even() as i64;
    (code.clamp(g.qmin() as i64, g.qmax() as i64) - g.zp as i64) as f32 * g.scale
}

/// The straight-through mask, computed independently: the unclamped code in range.
fn in_range(x: f32, g: &G) -> bool {
    let q = (x * (1.0f32 / g.scale)).round_ties_even();
    q >= g.lo() as f32 && q <= g.hi() as f32
}

/// `f(x)` and the gradient of `sum(f(x) * g)` with respect to `x`, through candle autograd.
fn value_and_grad(
    x: &Tensor,
    g: &Tensor,
    f: impl Fn(&Tensor) -> qat_core::Result<Tensor>,
) -> (Tensor, Tensor) {
    let v = Var::from_tensor(x).unwrap();
    let y = f(v.as_tensor()).unwrap();
    let grads = y.mul(g).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = grads
        .get(v.as_tensor())
        .expect("no gradient reached the input")
        .clone();
    (y, gx)
}

/// An upstream gradient of `x`'s shape, uniform in [-2, 2).
fn upstream_grad(x: &Tensor, seed: u64) -> Tensor {
    let v = Rng::new(seed).vec(x.elem_count(), -2.0, 2.0);
    Tensor::from_vec(v, x.shape(), x.device()).unwrap()
}

/// Index of the first element whose bits differ, with both values, for readable failures.
fn first_diff(a: &Tensor, b: &Tensor) -> Option<(usize, f32, f32)> {
    let (a, b) = (vals(a), vals(b));
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(&b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
        .map(|i| (i, a[i], b[i]))
}

/// Observer configs for a random dtype, reduce_range and scheme (those PyTorch accepts).
fn observer_config(
    bits: u8,
    signed: bool,
    reduce: bool,
    symmetric: bool,
    per_channel: bool,
    axis: usize,
) -> Option<ObserverConfig> {
    let scheme = match (per_channel, symmetric) {
        (false, false) => QScheme::PerTensorAffine,
        (false, true) => QScheme::PerTensorSymmetric,
        (true, false) => QScheme::PerChannelAffine,
        (true, true) => QScheme::PerChannelSymmetric,
    };
    let cfg = ObserverConfig::new(QDType::new(bits, signed).ok()?, scheme)
        .with_reduce_range(reduce)
        .with_ch_axis(axis);
    cfg.quant_range().ok().map(|_| cfg)
}

fn make_observer(cfg: ObserverConfig, averaging: Option<f32>) -> MinMaxObserver {
    match averaging {
        Some(c) => MinMaxObserver::moving_average(cfg, c).unwrap(),
        None => MinMaxObserver::new(cfg).unwrap(),
    }
}

/// Finite f32 without negative zero (`-0.0 + 0.0 == +0.0`), so that min/max are unambiguous
/// bit patterns.
fn finite_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -1e3f32..1e3,
        1 => prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO,
    ]
    .prop_map(|v| v + 0.0)
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Property 1: Fake quantization is idempotent: outputs are grid points, and grid points are
    /// fixed points (`k * scale * (1 / scale)` is within 3 ulps of `k`, far from a rounding
    /// boundary, for `|k| <= 2^8`).
    #[test]
    fn fake_quant_is_idempotent(g in grid(), gens in vec(xgen(), 1..256)) {
        let x = t1(&values(&gens, &g, false));
        let y = fq(&x, &g);
        let yy = fq(&y, &g);
        prop_assert_eq!(first_diff(&y, &yy), None);
    }

    /// Property 2: Inside the representable range the error is at most half a step.
    ///
    /// Slack: `x * (1 / scale)` rounds twice (the reciprocal, the product), so the code `k`
    /// the kernel picks satisfies `|k - x/scale| <= 1/2 + |x/scale| * 2u(1 + u)`
    /// (`u = 2^-24`), and `y = fl(k * scale)` adds `|y| * u`. Together:
    /// `|y - x| <= scale/2 + |x| * 2.01u + |y| * u`, which `(|x| + |y|) * 2^-22 = 4u` covers.
    /// With `|k| <= 255` this slack is below `2e-4 * scale`, so a wrong code could not hide
    /// in it. The difference itself is taken in f64 (exact).
    #[test]
    fn error_is_at_most_half_a_step_inside_the_range(g in grid(), gens in vec(xgen(), 1..256)) {
        let xs = values(&gens, &g, true);
        let ys = vals(&fq(&t1(&xs), &g));
        for (&x, &y) in xs.iter().zip(&ys) {
            let slack = (x.abs() as f64 + y.abs() as f64) * 2f64.powi(-22);
            let err = (y as f64 - x as f64).abs();
            prop_assert!(
                err <= g.scale as f64 / 2.0 + slack,
                "x = {x:e}, y = {y:e}, |y - x| = {err:e} > scale/2 = {:e} (+ {slack:e})",
                g.scale / 2.0
            );
        }
    }

    /// Property 3: Every output is `k * scale` with `k` an integer in `[qmin - zp, qmax - zp]`:
    /// recomputing the code as `round(y * (1 / scale))` gives back exactly `y`, and
    /// `y * (1 / scale)` is that integer up to the two roundings of the product (3 ulps).
    #[test]
    fn outputs_lie_on_the_grid(g in grid(), gens in vec(xgen(), 1..256)) {
        let ys = vals(&fq(&t1(&values(&gens, &g, false)), &g));
        let inv = 1.0f32 / g.scale;
        for &y in &ys {
            prop_assert!(y.is_finite());
            let v = y * inv;
            let k = v.round_ties_even();
            prop_assert!(
                k >= g.lo() as f32 && k <= g.hi() as f32,
                "code {k} of y = {y:e} outside [{}, {}]", g.lo(), g.hi()
            );
            prop_assert_eq!((k * g.scale).to_bits(), y.to_bits(),
                "y = {:e} is not {} * scale", y, k);
            prop_assert!(
                (v - k).abs() <= k.abs() * 4.0 * f32::EPSILON,
                "y / scale = {v} is not integral"
            );
        }
    }

    /// Outputs equal PyTorch's kernel formula element by element (int64 codes).
    #[test]
    fn matches_pytorch_formula(g in grid(), gens in vec(xgen(), 1..256)) {
        let xs = values(&gens, &g, false);
        let ys = vals(&fq(&t1(&xs), &g));
        for (&x, &y) in xs.iter().zip(&ys) {
            prop_assert_eq!(y.to_bits(), torch_fq(x, &g).to_bits(), "x = {:e}", x);
        }
    }

    /// Exact ties `(k + 0.5) * 2^e` round half to even (then clamp), as `std::nearbyint`.
    #[test]
    fn exact_ties_round_half_to_even(
        range in range_strategy(),
        e in -13i32..=3,
        zi in any::<Index>(),
        ks in vec(any::<Index>(), 1..64),
    ) {
        let g = G { range, scale: 2f32.powi(e), zp: zp_in(&range, zi) };
        let codes: Vec<i32> = ks.iter()
            .map(|i| g.lo() - 2 + i.index((g.hi() - g.lo() + 4) as usize) as i32)
            .collect();
        let xs: Vec<f32> = codes.iter().map(|&k| (k as f32 + 0.5) * g.scale).collect();
        let ys = vals(&fq(&t1(&xs), &g));
        for ((&k, &x), &y) in codes.iter().zip(&xs).zip(&ys) {
            // The tie is exact: a power-of-two scale loses nothing.
            prop_assert_eq!(x * (1.0 / g.scale), k as f32 + 0.5);
            // The code is an integer (PyTorch's int64), so a zero result is +0.0.
            let code = ((k as f32 + 0.5).round_ties_even() as i32).clamp(g.lo(), g.hi());
            let want = code as f32 * g.scale;
            prop_assert_eq!(y.to_bits(), want.to_bits(), "x = ({} + 0.5) * {:e}", k, g.scale);
        }
    }

    /// Property 4: Per-channel fake quantization equals, slice by slice along the axis, per-tensor
    /// fake quantization with that channel's scale and zero point.
    #[test]
    fn per_channel_equals_per_tensor_on_each_slice(case in pc_case(5, 1..=4)) {
        let x = case.tensor();
        let (qmin, qmax) = (case.range.quant_min(), case.range.quant_max());
        let y = fake_quantize_per_channel(&x, &case.scales, &case.zps, case.axis, qmin, qmax)
            .unwrap();
        prop_assert_eq!(y.dims(), x.dims());
        for c in 0..case.channels() {
            let want = fq(&x.narrow(case.axis, c, 1).unwrap(), &case.grid(c));
            let got = y.narrow(case.axis, c, 1).unwrap();
            prop_assert_eq!(first_diff(&got, &want), None, "channel {}", c);
        }
    }

    /// Property 5: The fused CPU op and the composite op agree bit for bit, values and gradients,
    /// per tensor.
    #[test]
    fn fused_equals_composite_per_tensor(
        g in grid(),
        gens in vec(xgen(), 1..256),
        seed in any::<u64>(),
    ) {
        let x = t1(&values(&gens, &g, false));
        let dy = t1(&Rng::new(seed).vec(gens.len(), -2.0, 2.0));
        let (qp, range) = (g.qparams(), g.range);
        let (y1, g1) = value_and_grad(&x, &dy, |x| fake_quantize(x, &qp, &range));
        let (y2, g2) = value_and_grad(&x, &dy, |x| fake_quantize_composite(x, &qp, &range));
        prop_assert_eq!(first_diff(&y1, &y2), None, "values");
        prop_assert_eq!(first_diff(&g1, &g2), None, "gradients");
    }

    /// Property 5: ... and per channel.
    #[test]
    fn fused_equals_composite_per_channel(case in pc_case(5, 1..=4), seed in any::<u64>()) {
        let x = case.tensor();
        let dy = upstream_grad(&x, seed);
        let (qp, range) = (case.qparams(), case.range);
        let (y1, g1) = value_and_grad(&x, &dy, |x| fake_quantize(x, &qp, &range));
        let (y2, g2) = value_and_grad(&x, &dy, |x| fake_quantize_composite(x, &qp, &range));
        prop_assert_eq!(first_diff(&y1, &y2), None, "values");
        prop_assert_eq!(first_diff(&g1, &g2), None, "gradients");
    }

    /// Property 6: The gradient is exactly `dy` where the unclamped code `round(x / scale)` lies in
    /// `[qmin - zp, qmax - zp]`, and zero elsewhere (per tensor, fused and composite).
    #[test]
    fn gradient_is_the_straight_through_mask(
        g in grid(),
        gens in vec(xgen(), 1..256),
        seed in any::<u64>(),
    ) {
        let xs = values(&gens, &g, false);
        let dys = Rng::new(seed).vec(xs.len(), -2.0, 2.0);
        let (x, dy) = (t1(&xs), t1(&dys));
        let (qp, range) = (g.qparams(), g.range);
        for composite in [false, true] {
            let (_, gx) = value_and_grad(&x, &dy, |x| if composite {
                fake_quantize_composite(x, &qp, &range)
            } else {
                fake_quantize(x, &qp, &range)
            });
            for ((&x, &d), &got) in xs.iter().zip(&dys).zip(&vals(&gx)) {
                if in_range(x, &g) {
                    prop_assert_eq!(
                        got.to_bits(), d.to_bits(),
                        "x = {:e} is in range (composite: {})", x, composite
                    );
                } else {
                    prop_assert_eq!(
                        got, 0.0, "x = {:e} is out of range (composite: {})", x, composite
                    );
                }
            }
        }
    }

    /// Property 6: ... per channel, each element masked by its own channel's grid.
    #[test]
    fn gradient_is_the_straight_through_mask_per_channel(
        case in pc_case(5, 1..=4),
        seed in any::<u64>(),
    ) {
        let x = case.tensor();
        let dys = Rng::new(seed).vec(case.xs.len(), -2.0, 2.0);
        let dy = Tensor::from_slice(&dys, x.shape(), x.device()).unwrap();
        let (qp, range) = (case.qparams(), case.range);
        let (_, gx) = value_and_grad(&x, &dy, |x| fake_quantize(x, &qp, &range));
        for (i, &got) in vals(&gx).iter().enumerate() {
            let (xv, d) = (case.xs[i], dys[i]);
            if in_range(xv, &case.grid(case.channel_of(i))) {
                prop_assert_eq!(got.to_bits(), d.to_bits(), "element {}", i);
            } else {
                prop_assert_eq!(got, 0.0, "element {}", i);
            }
        }
    }

    /// Non-contiguous inputs (transposed) give the transposed result of the contiguous input.
    #[test]
    fn non_contiguous_input_matches_contiguous(case in pc_case(5, 2..=4)) {
        let x = case.tensor();
        let last = x.rank() - 1;
        let xt = x.transpose(0, last).unwrap();
        let axis_t = if case.axis == 0 { last } else if case.axis == last { 0 } else { case.axis };
        let qp_t = QParams::PerChannel {
            scale: case.scales.clone(),
            zero_point: case.zps.clone(),
            axis: axis_t,
        };
        for composite in [false, true] {
            let f = |x: &Tensor, qp: &QParams| if composite {
                fake_quantize_composite(x, qp, &case.range).unwrap()
            } else {
                fake_quantize(x, qp, &case.range).unwrap()
            };
            let want = f(&x, &case.qparams()).transpose(0, last).unwrap();
            let got = f(&xt, &qp_t);
            prop_assert_eq!(first_diff(&got, &want), None, "composite: {}", composite);
        }
    }
}

/// Large tensors take the multi-threaded path (chunks of 2^15 elements whose boundaries do
/// not fall on channel boundaries): per-channel results must still equal PyTorch's formula
/// with each element's own channel, and the composite op (values and gradients).
mod large {
    use super::*;

    const SHAPES: [&[usize]; 4] = [&[3, 7, 4099], &[5, 13331], &[13331, 5], &[2, 3, 11003]];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]

        #[test]
        fn large_per_channel_matches_formula_and_composite(
            shape in any::<Index>(),
            axis in any::<Index>(),
            range in range_strategy(),
            seed in any::<u64>(),
        ) {
            let dims = SHAPES[shape.index(SHAPES.len())].to_vec();
            let axis = axis.index(dims.len());
            let c = dims[axis];
            let mut rng = Rng::new(seed);
            let mut case = PcCase {
                scales: (0..c).map(|_| 10f32.powf(rng.uniform(-4.0, 1.0))).collect(),
                zps: (0..c)
                    .map(|_| pick(rng.unit(), range.quant_min(), range.quant_max()))
                    .collect(),
                dims,
                axis,
                range,
                xs: Vec::new(),
            };
            let n: usize = case.dims.iter().product();
            case.xs = (0..n)
                .map(|i| {
                    let g = case.grid(case.channel_of(i));
                    let u = rng.uniform(g.lo() as f32 - 3.0, g.hi() as f32 + 3.0);
                    u * g.scale
                })
                .collect();
            let x = case.tensor();
            let dy = Tensor::from_vec(rng.vec(n, -2.0, 2.0), x.shape(), x.device()).unwrap();
            let (qp, range) = (case.qparams(), case.range);
            let (y1, g1) = value_and_grad(&x, &dy, |x| fake_quantize(x, &qp, &range));
            let ys = vals(&y1);
            for (i, (&xv, &y)) in case.xs.iter().zip(&ys).enumerate() {
                let want = torch_fq(xv, &case.grid(case.channel_of(i)));
                prop_assert_eq!(y.to_bits(), want.to_bits(), "element {} (x = {:e})", i, xv);
            }
            let (y2, g2) = value_and_grad(&x, &dy, |x| fake_quantize_composite(x, &qp, &range));
            prop_assert_eq!(first_diff(&y1, &y2), None, "values");
            prop_assert_eq!(first_diff(&g1, &g2), None, "gradients");
        }
    }
}

/// Property 7: Observers.
mod observers {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        /// MinMaxObserver's running min/max is the min/max of everything seen so far.
        #[test]
        fn minmax_tracks_extremes_of_everything_seen(
            batches in vec(vec(finite_value(), 1..80), 1..6),
            bits in 2u8..=8,
            signed in any::<bool>(),
        ) {
            let dtype = QDType::new(bits, signed).unwrap();
            let cfg = ObserverConfig::new(dtype, QScheme::PerTensorAffine);
            let mut obs = MinMaxObserver::new(cfg).unwrap();
            prop_assert_eq!(obs.min_max(), None);
            let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
            for b in &batches {
                obs.observe(&t1(b)).unwrap();
                for &v in b {
                    mn = mn.min(v);
                    mx = mx.max(v);
                }
                prop_assert_eq!(obs.min_max(), Some((vec![mn], vec![mx])));
            }
        }

        /// The moving average after k inputs is the f32 recurrence: first batch as is, then
        /// `v = v + c * (batch - v)`.
        #[test]
        fn moving_average_is_the_f32_recurrence(
            batches in vec(vec(-1e6f32..1e6, 1..80), 1..8),
            c in prop_oneof![Just(0.01f32), Just(1.0f32), 1e-3f32..1.0],
        ) {
            let cfg = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine);
            let mut obs = MinMaxObserver::moving_average(cfg, c).unwrap();
            let mut state: Option<(f32, f32)> = None;
            for b in &batches {
                obs.observe(&t1(b)).unwrap();
                let bmin = b.iter().copied().fold(f32::INFINITY, f32::min) + 0.0;
                let bmax = b.iter().copied().fold(f32::NEG_INFINITY, f32::max) + 0.0;
                state = Some(match state {
                    None => (bmin, bmax),
                    Some((lo, hi)) => (lo + c * (bmin - lo), hi + c * (bmax - hi)),
                });
                let (lo, hi) = state.unwrap();
                let (got_lo, got_hi) = obs.min_max().unwrap();
                prop_assert_eq!(got_lo[0].to_bits(), lo.to_bits(), "min: {} vs {}", got_lo[0], lo);
                prop_assert_eq!(got_hi[0].to_bits(), hi.to_bits(), "max: {} vs {}", got_hi[0], hi);
            }
        }

        /// A per-channel observer (extremes or moving average, affine or symmetric) equals a
        /// per-tensor observer fed each channel's slice: running min/max and qparams. Fed the
        /// transposed (non-contiguous) tensors with the axis moved, it sees the same.
        #[test]
        fn per_channel_observer_equals_per_tensor_on_each_slice(
            dims in vec(1usize..=4, 1..=4),
            axis in any::<Index>(),
            n_batches in 1usize..4,
            bits in 2u8..=8,
            signed in any::<bool>(),
            reduce in any::<bool>(),
            symmetric in any::<bool>(),
            averaging in prop_oneof![Just(None), (1e-3f32..=1.0).prop_map(Some)],
            seed in any::<u64>(),
        ) {
            let axis = axis.index(dims.len());
            let c = dims[axis];
            let rank = dims.len();
            let last = rank - 1;
            let axis_t = if axis == 0 { last } else if axis == last { 0 } else { axis };
            let pc_cfg = observer_config(bits, signed, reduce, symmetric, true, axis);
            prop_assume!(pc_cfg.is_some());
            let pc_cfg = pc_cfg.unwrap();
            let pt_cfg = observer_config(bits, signed, reduce, symmetric, false, 0).unwrap();
            let mut pc = make_observer(pc_cfg, averaging);
            let mut pc_t = make_observer(pc_cfg.with_ch_axis(axis_t), averaging);
            let mut pts: Vec<MinMaxObserver> =
                (0..c).map(|_| make_observer(pt_cfg, averaging)).collect();
            let mut rng = Rng::new(seed);
            let n: usize = dims.iter().product();
            let inner: usize = dims[axis + 1..].iter().product();
            for _ in 0..n_batches {
                // Each channel gets its own offset so that channels differ.
                let offsets = rng.vec(c, -20.0, 20.0);
                let xs: Vec<f32> = rng
                    .vec(n, -50.0, 50.0)
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| v + offsets[(i / inner) % c])
                    .collect();
                let x = Tensor::from_vec(xs, dims.as_slice(), &Device::Cpu).unwrap();
                pc.observe(&x).unwrap();
                pc_t.observe(&x.transpose(0, last).unwrap()).unwrap();
                for (ch, obs) in pts.iter_mut().enumerate() {
                    obs.observe(&x.narrow(axis, ch, 1).unwrap()).unwrap();
                }
            }
            let (mins, maxs) = pc.min_max().unwrap();
            prop_assert_eq!(pc_t.min_max(), Some((mins.clone(), maxs.clone())), "transposed input");
            prop_assert_eq!(mins.len(), c);
            let qp = pc.calculate_qparams().unwrap();
            let QParams::PerChannel { scale, zero_point, axis: qp_axis } = qp else {
                panic!("per-channel observer returned {qp:?}");
            };
            prop_assert_eq!(qp_axis, axis);
            for (ch, obs) in pts.iter().enumerate() {
                let (mn, mx) = obs.min_max().unwrap();
                prop_assert_eq!(mins[ch].to_bits(), mn[0].to_bits(), "min of channel {}", ch);
                prop_assert_eq!(maxs[ch].to_bits(), mx[0].to_bits(), "max of channel {}", ch);
                let qp = obs.calculate_qparams().unwrap();
                let QParams::PerTensor { scale: s, zero_point: z } = qp else {
                    panic!("per-tensor observer returned per-channel qparams");
                };
                prop_assert_eq!(scale[ch].to_bits(), s.to_bits(), "scale of channel {}", ch);
                prop_assert_eq!(zero_point[ch], z, "zero point of channel {}", ch);
            }
        }
    }
}

/// Property 8: f16 and bf16 inputs: the f32 result of the converted input, converted back (values
/// and gradients, fused and composite).
mod half_precision {
    use super::*;

    fn check(
        x32: &Tensor,
        dy32: &Tensor,
        qp: &QParams,
        range: &QuantRange,
        dt: DType,
    ) -> Result<(), TestCaseError> {
        let xh = x32.to_dtype(dt).unwrap();
        let dyh = dy32.to_dtype(dt).unwrap();
        // The reference: the converted input in f32.
        let (y_ref, g_ref) = value_and_grad(
            &xh.to_dtype(DType::F32).unwrap(),
            &dyh.to_dtype(DType::F32).unwrap(),
            |x| fake_quantize(x, qp, range),
        );
        let (y_ref, g_ref) = (y_ref.to_dtype(dt).unwrap(), g_ref.to_dtype(dt).unwrap());
        for composite in [false, true] {
            let (y, g) = value_and_grad(&xh, &dyh, |x| {
                if composite {
                    fake_quantize_composite(x, qp, range)
                } else {
                    fake_quantize(x, qp, range)
                }
            });
            prop_assert_eq!(y.dtype(), dt);
            prop_assert_eq!(g.dtype(), dt);
            prop_assert_eq!(
                first_diff(&y, &y_ref),
                None,
                "{:?} values (composite: {})",
                dt,
                composite
            );
            prop_assert_eq!(
                first_diff(&g, &g_ref),
                None,
                "{:?} gradients (composite: {})",
                dt,
                composite
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn half_inputs_per_tensor(
            g in grid(),
            gens in vec(xgen(), 1..256),
            bf16 in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let dt = if bf16 { DType::BF16 } else { DType::F16 };
            // Finite in f16 too (infinities are `composite_clamps_infinite_inputs_like_fused`).
            let xs: Vec<f32> =
                values(&gens, &g, false).into_iter().map(|v| v.clamp(-6e4, 6e4)).collect();
            let x = t1(&xs);
            let dy = t1(&Rng::new(seed).vec(gens.len(), -2.0, 2.0));
            check(&x, &dy, &g.qparams(), &g.range, dt)?;
        }

        #[test]
        fn half_inputs_per_channel(
            mut case in pc_case(5, 1..=4),
            bf16 in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let dt = if bf16 { DType::BF16 } else { DType::F16 };
            for v in &mut case.xs {
                *v = v.clamp(-6e4, 6e4);
            }
            let x = case.tensor();
            let dy = upstream_grad(&x, seed);
            check(&x, &dy, &case.qparams(), &case.range, dt)?;
        }
    }
}

/// The composite op (the path every non-CPU device takes) on a 0-d tensor, against the fused
/// op.
#[test]
fn composite_handles_rank0_tensors() {
    let x = Tensor::new(0.26f32, &Device::Cpu).unwrap();
    let range = QuantRange::explicit(0, 15).unwrap();
    let qp = QParams::PerTensor {
        scale: 0.1,
        zero_point: 3,
    };
    let fused = fake_quantize(&x, &qp, &range).unwrap();
    assert_eq!(fused.dims(), &[] as &[usize]);
    let composite = fake_quantize_composite(&x, &qp, &range)
        .expect("the composite op must accept a 0-d tensor like the fused op");
    assert_eq!(composite.dims(), fused.dims());
    assert_eq!(bits(&composite), bits(&fused));
}

/// The composite op must clamp infinite inputs to the ends of the grid like the fused op
/// (the kernel clamps the code before rounding; `inf * 1/scale` clamps to `hi + 1`, then `hi`).
#[test]
fn composite_clamps_infinite_inputs_like_fused() {
    let x = t1(&[f32::INFINITY, f32::NEG_INFINITY, 0.26]);
    let range = QuantRange::explicit(0, 15).unwrap();
    let qp = QParams::PerTensor {
        scale: 0.1,
        zero_point: 3,
    };
    let fused = fake_quantize(&x, &qp, &range).unwrap();
    assert_eq!(
        vals(&fused),
        vec![12.0f32 * 0.1, -3.0f32 * 0.1, 3.0f32 * 0.1]
    );
    let composite = fake_quantize_composite(&x, &qp, &range).unwrap();
    assert_eq!(first_diff(&composite, &fused), None);
}
