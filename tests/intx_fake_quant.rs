//! torchao intx fake quantization against a scalar reference written from torchao's Python
//! (`choose_qparams_affine`, `get_group_qparams_symmetric`, `get_groupwise_affine_qparams`,
//! `_fake_quantize_affine`), element by element with f32 (or f16/bf16) arithmetic, plus an
//! f64 property; the composite candle-ops path against the fused CPU op; the errors; the
//! stateful quantizer; and the range-learning gradients against finite differences.

use candle_core::{DType, Device, Tensor, Var};
use candle_qat::fake_quant::{
    intx_fake_quantize, intx_fake_quantize_backward, intx_fake_quantize_backward_masked,
    intx_fake_quantize_composite, intx_fake_quantize_masked, intx_fake_quantize_with, intx_qparams,
    IntxFakeQuantizer, IntxGranularity, IntxQParams, IntxSpec,
};
use candle_qat::Error;
use proptest::prelude::*;

/// The float format of the data: each torch op on an f16/bf16 tensor rounds its result.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fmt {
    F32,
    F16,
    BF16,
}

impl Fmt {
    fn r(self, v: f32) -> f32 {
        match self {
            Fmt::F32 => v,
            Fmt::F16 => half::f16::from_f32(v).to_f32(),
            Fmt::BF16 => half::bf16::from_f32(v).to_f32(),
        }
    }
    fn dtype(self) -> DType {
        match self {
            Fmt::F32 => DType::F32,
            Fmt::F16 => DType::F16,
            Fmt::BF16 => DType::BF16,
        }
    }
    fn smallest_normal(self) -> f32 {
        match self {
            Fmt::F16 => 6.103_515_6e-5,
            _ => f32::MIN_POSITIVE,
        }
    }
}

/// What torchao computes for one group: (scale, zero point, y, grad_x).
fn reference_group(
    x: &[f32],
    dy: &[f32],
    spec: &IntxSpec,
    fmt: Fmt,
) -> (f32, f32, Vec<f32>, Vec<f32>) {
    let r = |v: f32| fmt.r(v);
    let (qmin, qmax) = (spec.quant_min() as f32, spec.quant_max() as f32);
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (scale, zp) = match (spec.granularity(), spec.is_symmetric()) {
        (IntxGranularity::PerToken, _) => {
            // choose_qparams_affine, ASYMMETRIC.
            let eps = r(spec.eps().unwrap_or(fmt.smallest_normal()));
            let (min_neg, max_pos) = (min.min(0.0), max.max(0.0));
            let s = r(r(max_pos - min_neg) / (qmax - qmin)).max(eps);
            let z = qmin - r(min_neg / s).round_ties_even();
            (s, z.clamp(qmin, qmax))
        }
        (_, true) => {
            // get_group_qparams_symmetric -> choose_qparams_affine, SYMMETRIC.
            let eps = r(spec.eps().unwrap_or(fmt.smallest_normal()));
            let amax = (-min.min(0.0)).max(max.max(0.0));
            (r(amax / ((qmax - qmin) / 2.0)).max(eps), 0.0)
        }
        (_, false) => {
            // get_groupwise_affine_qparams -> _choose_qparams_affine_tinygemm, then int32.
            let eps = r(spec.eps().unwrap_or(1e-6));
            let b = spec.bits() as i32;
            let s = r(r(max - min) / (2f32.powi(b) - 1.0)).max(eps);
            (s, r(min + r(s * 2f32.powi(b - 1))).trunc())
        }
    };
    // _fake_quantize_affine: quantize with `x * (1.0 / scale)` in f32 (the scale is f32),
    // dequantize in the input's format, then the autograd chain.
    let inv = 1.0 / scale;
    let mut y = Vec::new();
    let mut gx = Vec::new();
    for (&v, &d) in x.iter().zip(dy) {
        let q = (v * inv).round_ties_even() + zp;
        let qc = q.clamp(qmin, qmax);
        y.push(r(r(qc - r(zp)) * scale));
        gx.push(if q > qmin && q < qmax {
            r(r(d * scale) * inv)
        } else {
            0.0
        });
    }
    (scale, zp, y, gx)
}

struct Expected {
    scale: Vec<f32>,
    zp: Vec<f32>,
    y: Vec<f32>,
    gx: Vec<f32>,
}

fn reference(x: &[f32], dy: &[f32], len: usize, spec: &IntxSpec, fmt: Fmt) -> Expected {
    let mut e = Expected {
        scale: vec![],
        zp: vec![],
        y: vec![],
        gx: vec![],
    };
    for (xg, dg) in x.chunks(len).zip(dy.chunks(len)) {
        let (s, z, y, g) = reference_group(xg, dg, spec, fmt);
        e.scale.push(s);
        e.zp.push(z);
        e.y.extend(y);
        e.gx.extend(g);
    }
    e
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// y, grad_x (for L = sum(y * dy)), scale and zero point from the fused op (or the
/// composite one).
fn run(
    x: &Tensor,
    dy: &Tensor,
    spec: &IntxSpec,
    composite: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let v = Var::from_tensor(x).unwrap();
    let (y, qp) = if composite {
        intx_fake_quantize_composite(v.as_tensor(), spec).unwrap()
    } else {
        intx_fake_quantize(v.as_tensor(), spec).unwrap()
    };
    assert_eq!(y.dtype(), x.dtype());
    let grads = (y.to_dtype(DType::F32).unwrap() * dy.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gx = grads.get(v.as_tensor()).unwrap();
    assert_eq!(gx.dtype(), x.dtype());
    (flat(&y), flat(gx), flat(qp.scale()), flat(qp.zero_point()))
}

/// Data with exact ties, zeros, a constant run and small values mixed in.
fn data_strategy(n: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            6 => -4.0f32..4.0,
            1 => Just(0.0f32),
            1 => (-16i32..16).prop_map(|k| k as f32 * 0.25),
            1 => -1e-6f32..1e-6,
        ],
        n,
    )
}

fn check(x: Vec<f32>, dims: &[usize], spec: &IntxSpec, fmt: Fmt) {
    let n = x.len();
    let x: Vec<f32> = x.into_iter().map(|v| fmt.r(v)).collect();
    let dy: Vec<f32> = (0..n)
        .map(|i| fmt.r(((i * 37) % 19) as f32 * 0.37 - 3.1))
        .collect();
    let len = match spec.granularity() {
        IntxGranularity::PerGroup(g) => g,
        _ => *dims.last().unwrap(),
    };
    let want = reference(&x, &dy, len, spec, fmt);
    let dev = Device::Cpu;
    let xt = Tensor::from_vec(x.clone(), dims, &dev)
        .unwrap()
        .to_dtype(fmt.dtype())
        .unwrap();
    let dyt = Tensor::from_vec(dy, dims, &dev)
        .unwrap()
        .to_dtype(fmt.dtype())
        .unwrap();
    for composite in [false, true] {
        let (y, gx, s, z) = run(&xt, &dyt, spec, composite);
        let what = if composite { "composite" } else { "fused" };
        assert_eq!(
            bits(&s),
            bits(&want.scale),
            "{what} scale, {spec:?} {fmt:?}"
        );
        assert_eq!(z, want.zp, "{what} zero point, {spec:?} {fmt:?}");
        assert_eq!(
            bits(&y),
            bits(&want.y),
            "{what} y, {spec:?} {fmt:?} x {x:?}"
        );
        assert_eq!(bits(&gx), bits(&want.gx), "{what} grad, {spec:?} {fmt:?}");
    }
}

fn fmt_strategy() -> impl Strategy<Value = Fmt> {
    prop_oneof![4 => Just(Fmt::F32), 1 => Just(Fmt::F16), 1 => Just(Fmt::BF16)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn per_group_matches_reference(
        bits in 1u8..=8,
        sym in any::<bool>(),
        g in prop::sample::select(vec![2usize, 4, 8, 16, 32]),
        rows in 1usize..4,
        groups in 1usize..4,
        fmt in fmt_strategy(),
        x in data_strategy(3 * 3 * 32),
    ) {
        let spec = IntxSpec::builder(bits).per_group(g);
        let spec = if sym { spec.symmetric() } else { spec.asymmetric() }.build().unwrap();
        let n = rows * groups * g;
        check(x[..n].to_vec(), &[rows, groups * g], &spec, fmt);
    }

    #[test]
    fn per_axis_matches_reference(
        bits in 1u8..=8,
        sym in any::<bool>(),
        rows in 1usize..5,
        cols in 2usize..40,
        fmt in fmt_strategy(),
        x in data_strategy(4 * 40),
    ) {
        let spec = IntxSpec::builder(bits).per_axis();
        let spec = if sym { spec.symmetric() } else { spec.asymmetric() }.build().unwrap();
        check(x[..rows * cols].to_vec(), &[rows, cols], &spec, fmt);
    }

    #[test]
    fn per_token_matches_reference(
        bits in 2u8..=8,
        lead in prop::collection::vec(1usize..4, 0..3),
        last in 1usize..40,
        eps in prop::option::of(1e-6f32..1e-2),
        fmt in fmt_strategy(),
        x in data_strategy(3 * 3 * 40),
    ) {
        let spec = IntxSpec::builder(bits).per_token().asymmetric().eps(eps).build().unwrap();
        let mut dims = lead.clone();
        dims.push(last);
        let n: usize = dims.iter().product();
        check(x[..n].to_vec(), &dims, &spec, fmt);
    }

    /// In f64: outputs lie on the grid `(k - zp) * scale`, within half a step of the input
    /// where the code is not clamped, and the gradient is dy exactly where it is non-zero
    /// up to f32 rounding.
    #[test]
    fn outputs_are_on_the_grid_in_f64(
        bits in 2u8..=8,
        g in prop::sample::select(vec![4usize, 8, 32]),
        x in data_strategy(2 * 64),
    ) {
        let spec = IntxSpec::builder(bits).per_group(g).build().unwrap();
        let xt = Tensor::from_vec(x.clone(), (2, 64), &Device::Cpu).unwrap();
        let (y, qp) = intx_fake_quantize(&xt, &spec).unwrap();
        let (y, s) = (flat(&y), flat(qp.scale()));
        let qmax = spec.quant_max() as f64;
        for (i, (&yi, &xi)) in y.iter().zip(&x).enumerate() {
            let step = s[i / g] as f64;
            let k = yi as f64 / step;
            prop_assert!((k - k.round()).abs() < 1e-4, "y[{i}] = {yi} off the grid {step}");
            let code = xi as f64 / step;
            if code.abs() < qmax - 0.5 {
                prop_assert!((yi as f64 - xi as f64).abs() <= 0.5 * step * (1.0 + 1e-5));
            }
        }
    }
}

#[test]
fn golden_edge_cases_all_zero_constant_and_eps() {
    // All-zero group: smallest-normal scale, zp 0 (symmetric) / 1e-6 (asymmetric per group)
    // / -128 per token; constant token: every code at qmax, so no gradient anywhere.
    for (spec, dims) in [
        (IntxSpec::int4_per_group(4).unwrap(), [2usize, 8]),
        (
            IntxSpec::builder(4)
                .per_group(4)
                .asymmetric()
                .build()
                .unwrap(),
            [2, 8],
        ),
        (IntxSpec::int8_per_token_asym(), [2, 8]),
    ] {
        let mut x = vec![0.0f32; 8];
        x.extend([0.75f32; 8]);
        check(x, &dims, &spec, Fmt::F32);
    }
    let z = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
    let qp = intx_qparams(&z, &IntxSpec::int8_per_token_asym()).unwrap();
    assert_eq!(flat(qp.scale()), vec![f32::MIN_POSITIVE]);
    assert_eq!(flat(qp.zero_point()), vec![-128.0]);
    let asym = IntxSpec::builder(4)
        .per_group(4)
        .asymmetric()
        .build()
        .unwrap();
    assert_eq!(flat(intx_qparams(&z, &asym).unwrap().scale()), vec![1e-6]);
}

#[test]
fn large_tensors_take_the_parallel_path_with_the_same_values() {
    // 3 * CHUNK elements in groups of 24 (not a divisor of CHUNK) and per token of 96.
    let n = 3 * 32768;
    let x: Vec<f32> = (0..n)
        .map(|i| (((i * 7919) % 4093) as f32 / 511.0 - 4.0) * (1.0 + (i / 5000) as f32))
        .collect();
    check(
        x.clone(),
        &[n / 96, 96],
        &IntxSpec::int4_per_group(24).unwrap(),
        Fmt::F32,
    );
    check(
        x,
        &[8, n / 96 / 8, 96],
        &IntxSpec::int8_per_token_asym(),
        Fmt::F32,
    );
}

#[test]
fn static_qparams_and_backward_kernel_match_the_dynamic_op() {
    let spec = IntxSpec::int4_per_group(8).unwrap();
    let x = Tensor::randn(0f32, 1.0, (4, 32), &Device::Cpu).unwrap();
    let dy = Tensor::randn(0f32, 1.0, (4, 32), &Device::Cpu).unwrap();
    let (y, qp) = intx_fake_quantize(&x, &spec).unwrap();
    assert_eq!(
        flat(&intx_fake_quantize_with(&x, &qp, &spec).unwrap()),
        flat(&y)
    );
    let (_, gx, _, _) = run(&x, &dy, &spec, false);
    let gk = intx_fake_quantize_backward(&x, &dy, &qp, &spec).unwrap();
    assert_eq!(flat(&gk), gx);
}

/// Under autograd the forward writes the straight-through mask and the backward reads it:
/// the gradient has the bits of the backward that recomputes the mask from the input, and
/// of the masked backward on its own; outputs and qparams are those of the unmasked
/// forward. Groups of 32 (AVX2/AVX-512 step kernels and the portable tail), 8, 24 and rows
/// of 64 and 1024 take a mask; groups of 12 do not (the recomputing backward runs).
#[test]
fn autograd_backward_from_the_mask_matches_the_recomputing_backward_bitwise() {
    let specs = [
        (IntxSpec::int4_per_group(32).unwrap(), (37, 96), true),
        (IntxSpec::int4_per_group(8).unwrap(), (16, 64), true),
        (IntxSpec::int4_per_group(24).unwrap(), (10, 48), true),
        (IntxSpec::int8_per_token_asym(), (5, 64), true),
        (IntxSpec::int8_per_token_asym(), (70, 1024), true),
        (IntxSpec::int4_per_group(12).unwrap(), (6, 36), false),
    ];
    for (spec, dims, masked) in specs {
        let x = (Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap() * 3.0).unwrap();
        let dy = Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap();
        let (y0, qp0) = intx_fake_quantize(&x, &spec).unwrap();
        let (y, gx, scale, zp) = run(&x, &dy, &spec, false);
        assert_eq!(bits(&y), bits(&flat(&y0)), "{spec:?}");
        assert_eq!(bits(&scale), bits(&flat(qp0.scale())), "{spec:?}");
        assert_eq!(bits(&zp), bits(&flat(qp0.zero_point())), "{spec:?}");
        let want = flat(&intx_fake_quantize_backward(&x, &dy, &qp0, &spec).unwrap());
        assert_eq!(bits(&gx), bits(&want), "{spec:?}");
        let (ym, qpm, mask) = intx_fake_quantize_masked(&x, &spec).unwrap();
        assert_eq!(bits(&flat(&ym)), bits(&flat(&y0)), "{spec:?}");
        assert_eq!(
            bits(&flat(qpm.scale())),
            bits(&flat(qp0.scale())),
            "{spec:?}"
        );
        assert_eq!(mask.is_some(), masked, "{spec:?}");
        if let Some(m) = mask {
            let gm = flat(&intx_fake_quantize_backward_masked(&dy, &m).unwrap());
            assert_eq!(bits(&gm), bits(&want), "{spec:?}");
            let e = intx_fake_quantize_backward_masked(&dy.flatten_all().unwrap(), &m);
            tensor_err(e.unwrap_err(), "grad_y has shape");
        }
    }
}

fn tensor_err(e: Error, needle: &str) {
    let msg = e.to_string();
    assert!(msg.contains(needle), "`{msg}` lacks `{needle}`");
}

#[test]
fn input_errors_name_the_problem_and_the_fix() {
    let dev = Device::Cpu;
    let spec = IntxSpec::int4_per_group(32).unwrap();
    let x = Tensor::zeros((4, 48), DType::F32, &dev).unwrap();
    tensor_err(intx_fake_quantize(&x, &spec).unwrap_err(), "divides 48");
    let x3 = Tensor::zeros((2, 4, 64), DType::F32, &dev).unwrap();
    tensor_err(intx_fake_quantize(&x3, &spec).unwrap_err(), "2-D");
    let xi = Tensor::zeros((4, 64), DType::U32, &dev).unwrap();
    tensor_err(
        intx_fake_quantize(&xi, &spec).unwrap_err(),
        "f32, f16 or bf16",
    );
    let s = Tensor::zeros((4, 64), DType::F32, &dev).unwrap();
    tensor_err(
        intx_fake_quantize(&s.sum_all().unwrap(), &IntxSpec::int8_per_token_asym()).unwrap_err(),
        "0-D",
    );
    // qparams of another shape
    let (_, qp) = intx_fake_quantize(&s, &spec).unwrap();
    let other = Tensor::zeros((2, 64), DType::F32, &dev).unwrap();
    tensor_err(
        intx_fake_quantize_with(&other, &qp, &spec).unwrap_err(),
        "same shape",
    );
    let bad = IntxQParams::new(
        Tensor::ones(3, DType::F32, &dev).unwrap(),
        Tensor::zeros(2, DType::F32, &dev).unwrap(),
    );
    tensor_err(bad.unwrap_err(), "one zero point per scale");
    // an asymmetric zero point the kernels cannot represent: a group offset by 1e7
    let far = Tensor::new(&[[1e7f32, 1e7, 1e7, 1e7]], &dev).unwrap();
    let asym = IntxSpec::builder(4)
        .per_group(2)
        .asymmetric()
        .build()
        .unwrap();
    tensor_err(
        intx_fake_quantize(&far, &asym).unwrap_err(),
        "symmetric per-group",
    );
}

#[test]
fn quantizer_dynamic_static_disabled() {
    let dev = Device::Cpu;
    let a = Tensor::new(&[[0.0f32, 1.0, 2.0, 3.0]], &dev).unwrap();
    let b = Tensor::new(&[[0.0f32, 10.0, 20.0, 30.0]], &dev).unwrap();
    let mut dynamic = IntxFakeQuantizer::new(IntxSpec::int8_per_token_asym());
    dynamic.forward(&a).unwrap();
    let s_a = flat(&dynamic.scale().unwrap());
    dynamic.forward(&b).unwrap();
    assert_ne!(flat(&dynamic.scale().unwrap()), s_a, "dynamic recomputes");

    let spec = IntxSpec::builder(8)
        .per_token()
        .asymmetric()
        .dynamic(false)
        .build()
        .unwrap();
    let mut fixed = IntxFakeQuantizer::new(spec);
    assert!(fixed.scale().is_none());
    fixed.forward(&a).unwrap();
    let yb = fixed.forward(&b).unwrap();
    assert_eq!(flat(&fixed.scale().unwrap()), s_a, "static keeps the first");
    // 30 clamps at the first batch's range (3.0).
    assert!(flat(&yb)[3] <= 3.0 + 1e-6);
    let qp = fixed.qparams().unwrap().unwrap();
    assert_eq!(
        flat(&intx_fake_quantize_with(&b, &qp, &spec).unwrap()),
        flat(&yb)
    );

    fixed.set_enabled(false);
    assert_eq!(flat(&fixed.forward(&b).unwrap()), flat(&b));
    assert!(!fixed.is_enabled());
}

#[test]
fn range_learning_needs_initialize_and_trains_vars() {
    let dev = Device::Cpu;
    let spec = IntxSpec::builder(4)
        .per_axis()
        .asymmetric()
        .dynamic(false)
        .range_learning(true)
        .build()
        .unwrap();
    let w = Tensor::new(&[[0.3f32, -0.7, 0.1, 0.9], [2.0, 1.0, -1.0, 0.5]], &dev).unwrap();
    let mut fq = IntxFakeQuantizer::new(spec);
    let e = fq.forward(&w).unwrap_err().to_string();
    assert!(e.contains("initialize"), "{e}");
    fq.initialize(&w).unwrap();
    let vars = fq.vars();
    assert_eq!(vars.len(), 2);
    // Zero point rounded and clamped into -8..=7 (tinygemm's can lie outside).
    for z in flat(vars[1].as_tensor()) {
        assert!((-8.0..=7.0).contains(&z) && z == z.round());
    }
    let y = fq.forward(&w).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(vars[0].as_tensor()).is_some());
    assert!(grads.get(vars[1].as_tensor()).is_some());

    let sym = IntxSpec::builder(8)
        .per_axis()
        .dynamic(false)
        .range_learning(true)
        .build()
        .unwrap();
    let mut fq = IntxFakeQuantizer::new(sym);
    fq.initialize(&w).unwrap();
    assert_eq!(fq.vars().len(), 1, "symmetric learns the scale only");
    assert_eq!(flat(&fq.zero_point().unwrap()), vec![0.0, 0.0]);
}

/// The range-learning gradients are the exact derivatives of the forward with each
/// `round` replaced by `v + c` (c = round(v) - v held fixed) and the clamp mask held
/// fixed — the straight-through estimator torchao's autograd computes. Checked against
/// central differences of that function in f64.
#[test]
fn range_learning_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let spec = IntxSpec::builder(4)
        .per_axis()
        .asymmetric()
        .dynamic(false)
        .range_learning(true)
        .build()
        .unwrap();
    let (rows, cols) = (3usize, 16usize);
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 97) as f32 / 20.0 - 2.2)
        .collect();
    let dy: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 31) % 11) as f32 / 5.0 - 1.0)
        .collect();
    let xt = Tensor::from_vec(x.clone(), (rows, cols), &dev).unwrap();
    let dyt = Tensor::from_vec(dy.clone(), (rows, cols), &dev).unwrap();
    let mut fq = IntxFakeQuantizer::new(spec);
    fq.initialize(&xt).unwrap();
    let vars = fq.vars();
    // Move the qparams off the initial grid so that codes are not at ties.
    vars[0].set(&(vars[0].as_tensor() * 0.9).unwrap()).unwrap();
    vars[1].set(&(vars[1].as_tensor() + 0.3).unwrap()).unwrap();
    let xv = Var::from_tensor(&xt).unwrap();
    let y = fq.forward(xv.as_tensor()).unwrap();
    let grads = (&y * &dyt).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = flat(grads.get(vars[0].as_tensor()).unwrap());
    let gz = flat(grads.get(vars[1].as_tensor()).unwrap());
    let gx = flat(grads.get(xv.as_tensor()).unwrap());
    let s0: Vec<f64> = flat(vars[0].as_tensor())
        .iter()
        .map(|&v| v as f64)
        .collect();
    let z0: Vec<f64> = flat(vars[1].as_tensor())
        .iter()
        .map(|&v| v as f64)
        .collect();
    let (qmin, qmax) = (spec.quant_min() as f64, spec.quant_max() as f64);

    // The surrogate of row r as a function of (x, s, z), with c and the mask from s0, z0.
    let row_loss = |r: usize, xs: &[f64], s: f64, z: f64| -> f64 {
        let mut l = 0.0;
        for (j, &xj) in xs.iter().enumerate() {
            let i = r * cols + j;
            let v0 = x[i] as f64 / s0[r];
            let c = v0.round_ties_even() - v0;
            let q0 = v0.round_ties_even() + z0[r];
            let q = if q0 > qmin && q0 < qmax {
                xj / s + c + z
            } else {
                q0.clamp(qmin, qmax)
            };
            l += dy[i] as f64 * (q - z) * s;
        }
        l
    };
    let h = 1e-4;
    for r in 0..rows {
        let xs: Vec<f64> = (0..cols).map(|j| x[r * cols + j] as f64).collect();
        let ds =
            (row_loss(r, &xs, s0[r] + h, z0[r]) - row_loss(r, &xs, s0[r] - h, z0[r])) / (2.0 * h);
        let dz =
            (row_loss(r, &xs, s0[r], z0[r] + h) - row_loss(r, &xs, s0[r], z0[r] - h)) / (2.0 * h);
        assert!(
            (gs[r] as f64 - ds).abs() <= 1e-3 * (1.0 + ds.abs()),
            "d scale row {r}: {} vs {ds}",
            gs[r]
        );
        assert!(
            (gz[r] as f64 - dz).abs() <= 1e-3 * (1.0 + dz.abs()),
            "d zp row {r}: {} vs {dz}",
            gz[r]
        );
        for j in 0..cols {
            let mut p = xs.clone();
            p[j] += h;
            let mut m = xs.clone();
            m[j] -= h;
            let d = (row_loss(r, &p, s0[r], z0[r]) - row_loss(r, &m, s0[r], z0[r])) / (2.0 * h);
            let g = gx[r * cols + j] as f64;
            assert!(
                (g - d).abs() <= 1e-3 * (1.0 + d.abs()),
                "dx[{r},{j}]: {g} vs {d}"
            );
        }
    }
}
