//! Every misuse is a `qat_core::Error` of the right variant whose message says what is wrong
//! and what to do, never a panic; failed calls leave observers and modules as they were;
//! empty tensors pass through everything and change nothing (PyTorch's `test_zero_numel`).

use std::error::Error as _;

use candle_core::{DType, Device, Tensor, Var};
use qat_core::fake_quant::{
    fake_quantize, fake_quantize_composite, fake_quantize_learnable, fake_quantize_per_channel,
    fake_quantize_per_tensor, FakeQuantize, FakeQuantizeState,
};
use qat_core::observer::{
    FixedQParamsObserver, HistogramObserver, MinMaxObserver, Observer, ObserverConfig,
    ObserverState,
};
use qat_core::qconfig::{Backend, FakeQuantizeSpec, ObserverKind, QConfig};
use qat_core::{calculate_qparams, Error, QDType, QParams, QScheme, QuantRange};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Config,
    QParams,
    ObserverInput,
    Tensor,
    State,
}

/// Unwraps the error of `r`, checks its variant, that its `what` mentions every string of
/// `what` and its `fix` every string of `fix`, and that the message carries both.
#[track_caller]
fn expect_err<T: std::fmt::Debug>(
    r: qat_core::Result<T>,
    kind: Kind,
    what: &[&str],
    fix: &[&str],
) -> Error {
    let err = match r {
        Ok(v) => panic!("expected a {kind:?} error, got Ok({v:?})"),
        Err(e) => e,
    };
    let (w, f) = match (&err, kind) {
        (Error::Config { what, fix }, Kind::Config)
        | (Error::QParams { what, fix }, Kind::QParams)
        | (Error::ObserverInput { what, fix, .. }, Kind::ObserverInput)
        | (Error::Tensor { what, fix }, Kind::Tensor)
        | (Error::State { what, fix }, Kind::State) => (what.clone(), fix.clone()),
        _ => panic!("expected a {kind:?} error, got {err:?}"),
    };
    for n in what {
        assert!(w.contains(n), "`what` of `{err}` should mention {n:?}");
    }
    for n in fix {
        assert!(f.contains(n), "`fix` of `{err}` should mention {n:?}");
    }
    assert!(
        !w.is_empty() && !f.is_empty(),
        "{err:?} must say what and what to do"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&w) && msg.contains(&f),
        "the message `{msg}` must carry both what ({w}) and fix ({f})"
    );
    err
}

/// An `ObserverInput` error that names `observer`.
#[track_caller]
fn expect_observer_err<T: std::fmt::Debug>(
    r: qat_core::Result<T>,
    observer: &str,
    what: &[&str],
    fix: &[&str],
) -> Error {
    let err = expect_err(r, Kind::ObserverInput, what, fix);
    let Error::ObserverInput { observer: name, .. } = &err else {
        unreachable!()
    };
    assert_eq!(*name, observer, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(observer), "`{msg}` should name {observer}");
    assert!(msg.contains("state is unchanged"), "{msg}");
    err
}

fn cpu() -> Device {
    Device::Cpu
}

fn t1(v: &[f32]) -> Tensor {
    Tensor::new(v, &cpu()).unwrap()
}

fn t2(rows: usize, cols: usize) -> Tensor {
    let v: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.37 - 1.5).collect();
    Tensor::from_vec(v, (rows, cols), &cpu()).unwrap()
}

fn u8r() -> QuantRange {
    QuantRange::new(QDType::QUINT8, None, false).unwrap()
}

fn per_tensor(scale: f32, zero_point: i32) -> QParams {
    QParams::PerTensor { scale, zero_point }
}

/// One observer of each kind and flavour, with the input shape it expects (channels on the
/// first or the last axis, to cover both per-channel reductions).
fn all_observers() -> Vec<Box<dyn Observer>> {
    let pt = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine);
    let pc0 = ObserverConfig::new(QDType::QINT8, QScheme::PerChannelSymmetric).with_ch_axis(0);
    let pc1 = ObserverConfig::new(QDType::QINT8, QScheme::PerChannelAffine).with_ch_axis(1);
    vec![
        Box::new(MinMaxObserver::new(pt).unwrap()),
        Box::new(MinMaxObserver::moving_average(pt, 0.01).unwrap()),
        Box::new(MinMaxObserver::new(pc0).unwrap()),
        Box::new(MinMaxObserver::new(pc1).unwrap()),
        Box::new(MinMaxObserver::moving_average(pc0, 0.01).unwrap()),
        Box::new(MinMaxObserver::moving_average(pc1, 0.5).unwrap()),
        Box::new(HistogramObserver::new(pt, 64).unwrap()),
    ]
}

/// One fake-quant of each flavour: MinMax / moving average, per tensor / per channel,
/// histogram, fixed qparams, learnable per tensor and per channel. All take inputs with 3
/// channels on axis 0.
fn all_fake_quants() -> Vec<(&'static str, FakeQuantize)> {
    let specs: Vec<(&'static str, FakeQuantizeSpec)> = vec![
        (
            "x86 activation",
            QConfig::default_qat(Backend::X86).activation,
        ),
        ("x86 weight", QConfig::default_qat(Backend::X86).weight),
        (
            "qnnpack weight",
            QConfig::default_qat(Backend::Qnnpack).weight,
        ),
        (
            "minmax 4-bit",
            FakeQuantizeSpec::builder()
                .bits(4)
                .observer(ObserverKind::MinMax)
                .build()
                .unwrap(),
        ),
        (
            "histogram",
            FakeQuantizeSpec::builder()
                .observer(ObserverKind::Histogram { bins: 64 })
                .build()
                .unwrap(),
        ),
        ("fixed sigmoid", FakeQuantizeSpec::fixed_sigmoid()),
        (
            "learnable per tensor",
            FakeQuantizeSpec::builder().learnable(true).build().unwrap(),
        ),
        (
            "learnable per channel",
            FakeQuantizeSpec::builder()
                .bits(4)
                .signed(true)
                .symmetric(true)
                .per_channel(0)
                .learnable(true)
                .build()
                .unwrap(),
        ),
    ];
    specs
        .into_iter()
        .map(|(name, spec)| (name, FakeQuantize::with_channels(&spec, 3).unwrap()))
        .collect()
}

fn empty_tensors() -> Vec<Tensor> {
    let mut v = Vec::new();
    for dt in [DType::F32, DType::F16, DType::BF16] {
        for shape in [&[0usize][..], &[0, 4], &[3, 0], &[2, 0, 4]] {
            v.push(Tensor::zeros(shape, dt, &cpu()).unwrap());
        }
    }
    v
}

// ---------------------------------------------------------------------------------------
// Ranges and widths
// ---------------------------------------------------------------------------------------

#[test]
fn quant_min_not_below_quant_max() {
    for (lo, hi) in [(3, 3), (5, -2), (0, 0), (127, -128)] {
        let what = format!("quant_min {lo} is not below quant_max {hi}");
        let what = [what.as_str()];
        let fix = ["quant_min < quant_max"];
        expect_err(
            QuantRange::new(QDType::QINT8, Some((lo, hi)), false),
            Kind::Config,
            &what,
            &fix,
        );
        expect_err(QuantRange::explicit(lo, hi), Kind::Config, &what, &fix);
        expect_err(
            ObserverConfig::new(QDType::QINT8, QScheme::PerTensorAffine)
                .with_range(lo, hi)
                .quant_range(),
            Kind::Config,
            &what,
            &fix,
        );
        expect_err(
            MinMaxObserver::new(
                ObserverConfig::new(QDType::QINT8, QScheme::PerTensorAffine).with_range(lo, hi),
            ),
            Kind::Config,
            &what,
            &fix,
        );
        expect_err(
            FakeQuantizeSpec::builder()
                .signed(true)
                .range(lo, hi)
                .build(),
            Kind::Config,
            &what,
            &fix,
        );
        // The bare ops take explicit bounds.
        let x = t1(&[0.5, 1.0]);
        expect_err(
            fake_quantize_per_tensor(&x, 0.1, 0, lo, hi),
            Kind::Config,
            &what,
            &fix,
        );
        expect_err(
            fake_quantize_per_channel(&x, &[0.1, 0.1], &[0, 0], 0, lo, hi),
            Kind::Config,
            &what,
            &fix,
        );
    }
}

/// A custom range that `reduce_range` halves to a single code (`0..=1` becomes `0..=0`) can
/// quantize nothing: its scale would be `(max - min) / 0`.
#[test]
fn reduce_range_that_empties_the_range_is_rejected() {
    let r = QuantRange::new(QDType::QUINT8, Some((0, 1)), true);
    expect_err(r, Kind::Config, &["quant_min", "quant_max"], &[]);
    let cfg = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine)
        .with_range(0, 1)
        .with_reduce_range(true);
    expect_err(cfg.quant_range(), Kind::Config, &["quant_min"], &[]);
}

#[test]
fn range_without_zero() {
    for (dtype, lo, hi) in [
        (QDType::QUINT8, 1, 255),
        (QDType::QINT8, -10, -1),
        (QDType::QINT8, 2, 100),
    ] {
        let what = format!("the range {lo}..={hi} does not contain 0");
        let what = [what.as_str()];
        let fix = ["quant_min <= 0 <= quant_max"];
        expect_err(
            QuantRange::new(dtype, Some((lo, hi)), false),
            Kind::Config,
            &what,
            &fix,
        );
        expect_err(
            QuantRange::new(dtype, Some((lo, hi)), true),
            Kind::Config,
            &what,
            &fix,
        );
        let cfg = ObserverConfig::new(dtype, QScheme::PerTensorAffine).with_range(lo, hi);
        expect_err(cfg.quant_range(), Kind::Config, &what, &fix);
        expect_err(MinMaxObserver::new(cfg), Kind::Config, &what, &fix);
        expect_err(HistogramObserver::new(cfg, 64), Kind::Config, &what, &fix);
    }
    // A range outside the dtype.
    expect_err(
        QuantRange::new(QDType::QINT8, Some((-200, 3)), false),
        Kind::Config,
        &["does not fit qint8"],
        &["inside the dtype"],
    );
}

#[test]
fn width_outside_2_to_8() {
    for bits in [0u8, 1, 9, 16, 255] {
        for signed in [false, true] {
            let what = format!("bit width {bits} is outside 2..=8");
            expect_err(
                QDType::new(bits, signed),
                Kind::Config,
                &[&what],
                &["width from 2 to 8"],
            );
            expect_err(
                FakeQuantizeSpec::builder()
                    .bits(bits)
                    .signed(signed)
                    .build(),
                Kind::Config,
                &[&what],
                &["width from 2 to 8"],
            );
        }
    }
    for bits in 2..=8 {
        assert!(QDType::new(bits, true).is_ok() && QDType::new(bits, false).is_ok());
    }
}

#[test]
fn other_config_errors() {
    let pt = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine);
    for c in [0.0f32, -0.1, 1.5, f32::NAN, f32::INFINITY] {
        expect_err(
            MinMaxObserver::moving_average(pt, c),
            Kind::Config,
            &["averaging constant"],
            &["(0, 1]"],
        );
    }
    for eps in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        expect_err(
            MinMaxObserver::new(pt.with_eps(eps)),
            Kind::Config,
            &["eps"],
            &["small positive eps"],
        );
    }
    expect_err(
        MinMaxObserver::new(
            ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorSymmetric)
                .with_reduce_range(true),
        ),
        Kind::Config,
        &["reduce_range", "quint8"],
        &["qint8"],
    );
    expect_err(
        HistogramObserver::new(pt, 0),
        Kind::Config,
        &["bins, got 0"],
        &["2048"],
    );
    expect_err(
        HistogramObserver::new(
            ObserverConfig::new(QDType::QINT8, QScheme::PerChannelAffine),
            64,
        ),
        Kind::Config,
        &["per-tensor schemes only"],
        &["per-channel MinMaxObserver"],
    );
    expect_err(
        FakeQuantize::new(
            &FakeQuantizeSpec::builder()
                .per_channel(0)
                .learnable(true)
                .build()
                .unwrap(),
        ),
        Kind::Config,
        &["channel count"],
        &["with_channels"],
    );
}

// ---------------------------------------------------------------------------------------
// Scales, zero points, axes
// ---------------------------------------------------------------------------------------

#[test]
fn bad_scale_for_every_op() {
    let x = t2(2, 3);
    let range = u8r();
    for bad in [
        0.0f32,
        -0.0,
        -1.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ] {
        let what = format!("scale {bad} is not a finite positive number");
        let what = [what.as_str()];
        let fix = ["use a scale > 0"];
        expect_err(
            fake_quantize_per_tensor(&x, bad, 0, 0, 255),
            Kind::QParams,
            &what,
            &fix,
        );
        // One bad channel among good ones.
        expect_err(
            fake_quantize_per_channel(&x, &[0.1, bad, 0.2], &[0, 0, 0], 1, 0, 255),
            Kind::QParams,
            &what,
            &fix,
        );
        expect_err(
            fake_quantize(&x, &per_tensor(bad, 0), &range),
            Kind::QParams,
            &what,
            &fix,
        );
        expect_err(
            fake_quantize_composite(&x, &per_tensor(bad, 0), &range),
            Kind::QParams,
            &what,
            &fix,
        );
        let scale = Tensor::new(&[bad], &cpu()).unwrap();
        let zp = Tensor::new(&[0.0f32], &cpu()).unwrap();
        expect_err(
            fake_quantize_learnable(&x, &scale, &zp, None, &range, 1.0),
            Kind::QParams,
            &what,
            &fix,
        );
        expect_err(
            FixedQParamsObserver::new(bad, 0, range),
            Kind::QParams,
            &what,
            &fix,
        );
        expect_err(
            per_tensor(bad, 0).validate(&range),
            Kind::QParams,
            &what,
            &fix,
        );
    }
}

/// A subnormal scale is finite and positive, so it passes validation; `1 / scale` then
/// overflows to inf and `0 * inf` is NaN. Either the scale is refused or the output is finite.
#[test]
fn subnormal_scale_is_rejected_or_gives_finite_output() {
    let x = t1(&[0.0, 1e-39, -1.0]);
    let scale = 1e-39f32;
    assert!(scale > 0.0 && !scale.is_normal());
    match fake_quantize_per_tensor(&x, scale, 0, -128, 127) {
        Err(e) => assert!(matches!(e, Error::QParams { .. }), "{e:?}"),
        Ok(y) => {
            let y = y.to_vec1::<f32>().unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
            assert_eq!(y[0], 0.0);
        }
    }
}

#[test]
fn zero_point_outside_the_range() {
    let x = t2(2, 3);
    let range = u8r();
    for zp in [-1, 256, i32::MIN, i32::MAX] {
        let what = format!("zero point {zp} is outside the range 0..=255");
        let what = [what.as_str()];
        let fix = ["zero point inside quant_min..=quant_max"];
        expect_err(
            fake_quantize_per_tensor(&x, 0.1, zp, 0, 255),
            Kind::QParams,
            &what,
            &fix,
        );
        expect_err(
            fake_quantize_per_channel(&x, &[0.1, 0.1, 0.1], &[0, 3, zp], 1, 0, 255),
            Kind::QParams,
            &what,
            &fix,
        );
        expect_err(
            fake_quantize(&x, &per_tensor(0.1, zp), &range),
            Kind::QParams,
            &what,
            &fix,
        );
        expect_err(
            fake_quantize_composite(&x, &per_tensor(0.1, zp), &range),
            Kind::QParams,
            &what,
            &fix,
        );
        expect_err(
            FixedQParamsObserver::new(0.1, zp, range),
            Kind::QParams,
            &what,
            &fix,
        );
        expect_err(range.check_zero_point(zp), Kind::QParams, &what, &fix);
    }
}

#[test]
fn per_channel_axis_out_of_range() {
    let x = t2(2, 3);
    for axis in [2usize, 3, 100] {
        let what = format!("axis {axis} is out of range for a tensor of shape [2, 3]");
        let what = [what.as_str()];
        let fix = ["axis below the tensor's rank"];
        expect_err(
            fake_quantize_per_channel(&x, &[0.1, 0.1], &[0, 0], axis, 0, 255),
            Kind::QParams,
            &what,
            &fix,
        );
        let qp = QParams::PerChannel {
            scale: vec![0.1; 3],
            zero_point: vec![0; 3],
            axis,
        };
        expect_err(fake_quantize(&x, &qp, &u8r()), Kind::QParams, &what, &fix);
        expect_err(
            fake_quantize_composite(&x, &qp, &u8r()),
            Kind::QParams,
            &what,
            &fix,
        );
        let s = Tensor::new(&[0.1f32, 0.1], &cpu()).unwrap();
        let z = Tensor::new(&[0.0f32, 0.0], &cpu()).unwrap();
        expect_err(
            fake_quantize_learnable(&x, &s, &z, Some(axis), &u8r(), 1.0),
            Kind::QParams,
            &what,
            &fix,
        );
        // Per-channel observers: an ObserverInput error, state unchanged.
        let cfg = ObserverConfig::new(QDType::QINT8, QScheme::PerChannelAffine).with_ch_axis(axis);
        for mut obs in [
            MinMaxObserver::new(cfg).unwrap(),
            MinMaxObserver::moving_average(cfg, 0.01).unwrap(),
        ] {
            let name = obs.name();
            let before = obs.state();
            expect_observer_err(
                obs.observe(&x),
                name,
                &[&format!("channel axis {axis} is out of range")],
                &["set ch_axis to an existing dimension"],
            );
            assert_eq!(obs.state(), before);
        }
    }
    // A 0-d tensor has no axis at all.
    let scalar = Tensor::new(1.0f32, &cpu()).unwrap();
    expect_err(
        fake_quantize_per_channel(&scalar, &[0.1], &[0], 0, 0, 255),
        Kind::QParams,
        &["axis 0 is out of range for a tensor of shape []"],
        &["axis below"],
    );
}

#[test]
fn per_channel_scale_count_differs_from_channels() {
    let x = t2(4, 3);
    for (axis, n) in [(0usize, 3usize), (0, 5), (1, 4), (1, 1)] {
        let channels = x.dims()[axis];
        let what = format!("{n} scales for {channels} channels along axis {axis}");
        let what = [what.as_str()];
        let fix = ["one scale and zero point per channel"];
        let (s, z) = (vec![0.1f32; n], vec![0i32; n]);
        expect_err(
            fake_quantize_per_channel(&x, &s, &z, axis, 0, 255),
            Kind::QParams,
            &what,
            &fix,
        );
        let qp = QParams::PerChannel {
            scale: s,
            zero_point: z,
            axis,
        };
        expect_err(
            fake_quantize_composite(&x, &qp, &u8r()),
            Kind::QParams,
            &what,
            &fix,
        );
        let st = Tensor::from_vec(vec![0.1f32; n], n, &cpu()).unwrap();
        let zt = Tensor::from_vec(vec![0.0f32; n], n, &cpu()).unwrap();
        expect_err(
            fake_quantize_learnable(&x, &st, &zt, Some(axis), &u8r(), 1.0),
            Kind::QParams,
            &[&format!("expected {channels}")],
            &["[C] per channel"],
        );
    }
    // Scales and zero points of different lengths.
    expect_err(
        fake_quantize_per_channel(&x, &[0.1; 4], &[0; 3], 0, 0, 255),
        Kind::QParams,
        &["4 scales but 3 zero points"],
        &["one zero point per scale"],
    );
    // And for calculate_qparams, mins and maxes of different lengths.
    expect_err(
        calculate_qparams(
            &[0.0, 1.0],
            &[1.0],
            QScheme::PerChannelAffine,
            &u8r(),
            f32::EPSILON,
            Some(0),
        ),
        Kind::QParams,
        &["2 minima but 1 maxima"],
        &["one min and one max per channel"],
    );
    expect_err(
        calculate_qparams(
            &[2.0],
            &[1.0],
            QScheme::PerTensorAffine,
            &u8r(),
            f32::EPSILON,
            None,
        ),
        Kind::QParams,
        &["min 2 > max 1"],
        &["feed the observer real data"],
    );
}

#[test]
fn learnable_bad_zero_point_and_grad_factor() {
    let x = t2(2, 3);
    let s = Tensor::new(&[0.1f32], &cpu()).unwrap();
    for bad in [f32::NAN, f32::INFINITY] {
        let z = Tensor::new(&[bad], &cpu()).unwrap();
        expect_err(
            fake_quantize_learnable(&x, &s, &z, None, &u8r(), 1.0),
            Kind::QParams,
            &["zero point is not finite"],
            &["reinitialise the zero point"],
        );
        let z = Tensor::new(&[0.0f32], &cpu()).unwrap();
        expect_err(
            fake_quantize_learnable(&x, &s, &z, None, &u8r(), bad),
            Kind::QParams,
            &["grad_factor"],
            &["finite grad_factor"],
        );
    }
}

// ---------------------------------------------------------------------------------------
// Dtypes
// ---------------------------------------------------------------------------------------

#[test]
fn integer_input_to_the_fake_quant_ops() {
    let range = u8r();
    for dt in [DType::U8, DType::U32, DType::I64, DType::F64] {
        let x = Tensor::zeros((2, 3), dt, &cpu()).unwrap();
        let dts = format!("{dt:?}");
        let fix = ["convert the input to f32"];
        expect_err(
            fake_quantize_per_tensor(&x, 0.1, 0, 0, 255),
            Kind::Tensor,
            &["fake_quantize got a", &dts, "f32, f16 or bf16"],
            &fix,
        );
        expect_err(
            fake_quantize_per_channel(&x, &[0.1; 3], &[0; 3], 1, 0, 255),
            Kind::Tensor,
            &[&dts],
            &fix,
        );
        expect_err(
            fake_quantize(&x, &per_tensor(0.1, 0), &range),
            Kind::Tensor,
            &[&dts],
            &fix,
        );
        expect_err(
            fake_quantize_composite(&x, &per_tensor(0.1, 0), &range),
            Kind::Tensor,
            &["fake_quantize_composite got a", &dts],
            &fix,
        );
        let s = Tensor::new(&[0.1f32], &cpu()).unwrap();
        let z = Tensor::new(&[0.0f32], &cpu()).unwrap();
        expect_err(
            fake_quantize_learnable(&x, &s, &z, None, &range, 1.0),
            Kind::Tensor,
            &["fake_quantize_learnable got a", &dts],
            &fix,
        );
        // Even empty integer tensors are refused by the ops.
        let empty = Tensor::zeros((0, 3), dt, &cpu()).unwrap();
        expect_err(
            fake_quantize_per_tensor(&empty, 0.1, 0, 0, 255),
            Kind::Tensor,
            &[&dts],
            &fix,
        );
    }
}

#[test]
fn integer_input_to_observers_and_modules() {
    let data = t2(3, 4);
    for dt in [DType::U8, DType::U32, DType::I64] {
        let x = Tensor::ones((3, 4), dt, &cpu()).unwrap();
        let dts = format!("dtype {dt:?}");
        for mut obs in all_observers() {
            let name = obs.name();
            for seen in [false, true] {
                if seen {
                    obs.observe(&data).unwrap();
                }
                let before = obs.state();
                expect_observer_err(
                    obs.observe(&x),
                    name,
                    &[&dts, "float tensors"],
                    &["convert the tensor to f32"],
                );
                assert_eq!(obs.state(), before, "{name}");
            }
        }
        for (name, mut fq) in all_fake_quants() {
            if name == "fixed sigmoid" {
                // The fixed observer looks at nothing; the op refuses the tensor. (The module's
                // qparams may be set to the fixed ones on the way: see
                // `fixed_qparams_fake_quantize_starts_with_its_fixed_qparams`.)
                expect_err(fq.forward(&x), Kind::Tensor, &[&format!("{dt:?}")], &[]);
                continue;
            }
            for seen in [false, true] {
                if seen {
                    fq.forward(&data).unwrap();
                }
                let before = fq.state();
                let err = fq.forward(&x).unwrap_err();
                assert!(
                    matches!(err, Error::ObserverInput { .. }),
                    "{name}: {err:?}"
                );
                assert_eq!(fq.state(), before, "{name}");
                if !seen {
                    continue; // per-channel qparams do not fit the input before an observation
                }
                // With the observer off, the op refuses it.
                fq.disable_observer();
                expect_err(
                    fq.forward(&x),
                    Kind::Tensor,
                    &[&format!("{dt:?}")],
                    &["convert the input to f32"],
                );
                assert_eq!(fq.state().scale, before.scale, "{name}");
                fq.enable_observer();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Non-finite inputs to observers
// ---------------------------------------------------------------------------------------

#[test]
fn non_finite_input_to_every_observer_leaves_its_state() {
    let good = t2(3, 4);
    let mut large: Vec<f32> = (0..3 * 40_000).map(|i| (i % 1000) as f32 * 0.01).collect();
    for mut obs in all_observers() {
        let name = obs.name();
        for seen in [false, true] {
            if seen {
                obs.observe(&good).unwrap();
            }
            let before = obs.state();
            let before_qp = obs.calculate_qparams().unwrap();
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for pos in [0usize, 5, 11] {
                    let mut v = good.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v[pos] = bad;
                    let x = Tensor::from_vec(v, (3, 4), &cpu()).unwrap();
                    let mut inputs = vec![
                        x.clone(),
                        // Non-contiguous: the transpose of the transpose.
                        x.t().unwrap().contiguous().unwrap().t().unwrap(),
                        x.to_dtype(DType::F16).unwrap(),
                        x.to_dtype(DType::BF16).unwrap(),
                        x.to_dtype(DType::F64).unwrap(),
                    ];
                    // Large enough for the multi-threaded reduction.
                    let at = pos * 10_000 + 3;
                    let keep = large[at];
                    large[at] = bad;
                    inputs.push(Tensor::from_slice(&large, (3, 40_000), &cpu()).unwrap());
                    large[at] = keep;
                    for x in inputs {
                        expect_observer_err(
                            obs.observe(&x),
                            name,
                            &["NaN or infinite"],
                            &["feed only finite tensors"],
                        );
                        assert_eq!(obs.state(), before, "{name}, bad = {bad}, {:?}", x.dtype());
                        assert_eq!(obs.calculate_qparams().unwrap(), before_qp, "{name}");
                    }
                }
            }
        }
    }
}

#[test]
fn non_finite_input_to_fake_quantize_leaves_its_state() {
    let good = t2(3, 4);
    for (name, mut fq) in all_fake_quants() {
        if name == "fixed sigmoid" {
            continue; // a fixed observer does not look at its input
        }
        fq.forward(&good).unwrap();
        let before = fq.state();
        for bad in [f32::NAN, f32::INFINITY] {
            let mut v = good.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[7] = bad;
            let x = Tensor::from_vec(v, (3, 4), &cpu()).unwrap();
            let err = fq.forward(&x).unwrap_err();
            assert!(
                matches!(err, Error::ObserverInput { .. }),
                "{name}: {err:?}"
            );
            assert!(err.to_string().contains(fq.observer().name()), "{err}");
            assert_eq!(fq.state(), before, "{name}");
        }
    }
}

#[test]
fn channel_count_change_is_an_observer_error() {
    let cfg = ObserverConfig::new(QDType::QINT8, QScheme::PerChannelSymmetric);
    for mut obs in [
        MinMaxObserver::new(cfg).unwrap(),
        MinMaxObserver::moving_average(cfg, 0.01).unwrap(),
    ] {
        let name = obs.name();
        obs.observe(&t2(2, 3)).unwrap();
        let before = obs.state();
        expect_observer_err(
            obs.observe(&t2(3, 3)),
            name,
            &["3 channels along axis 0", "earlier inputs had 2"],
            &["same channel count"],
        );
        assert_eq!(obs.state(), before);
    }
}

// ---------------------------------------------------------------------------------------
// Empty tensors (PyTorch's test_zero_numel)
// ---------------------------------------------------------------------------------------

#[test]
fn empty_tensors_pass_through_every_op() {
    let range = u8r();
    for x in empty_tensors() {
        let check = |y: Tensor, what: &str| {
            assert_eq!(y.dims(), x.dims(), "{what}");
            assert_eq!(y.dtype(), x.dtype(), "{what}");
            assert_eq!(y.elem_count(), 0, "{what}");
        };
        check(
            fake_quantize_per_tensor(&x, 0.1, 3, 0, 255).unwrap(),
            "per tensor",
        );
        check(
            fake_quantize(&x, &per_tensor(0.1, 3), &range).unwrap(),
            "fake_quantize",
        );
        check(
            fake_quantize_composite(&x, &per_tensor(0.1, 3), &range).unwrap(),
            "composite",
        );
        for axis in 0..x.rank() {
            let c = x.dims()[axis];
            let (s, z) = (vec![0.1f32; c], vec![3i32; c]);
            check(
                fake_quantize_per_channel(&x, &s, &z, axis, 0, 255).unwrap(),
                "per channel",
            );
            let qp = QParams::PerChannel {
                scale: s.clone(),
                zero_point: z,
                axis,
            };
            check(
                fake_quantize_composite(&x, &qp, &range).unwrap(),
                "composite per channel",
            );
            let st = Tensor::from_vec(s, c, &cpu()).unwrap();
            let zt = Tensor::zeros(c, DType::F32, &cpu()).unwrap();
            check(
                fake_quantize_learnable(&x, &st, &zt, Some(axis), &range, 1.0).unwrap(),
                "learnable per channel",
            );
        }
        let st = Tensor::new(&[0.1f32], &cpu()).unwrap();
        let zt = Tensor::new(&[0.0f32], &cpu()).unwrap();
        check(
            fake_quantize_learnable(&x, &st, &zt, None, &range, 1.0).unwrap(),
            "learnable",
        );
        // Gradients through an empty fake-quant are empty too.
        let v = Var::from_tensor(&x).unwrap();
        let y = fake_quantize_per_tensor(v.as_tensor(), 0.1, 3, 0, 255).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        if let Some(g) = grads.get(v.as_tensor()) {
            assert_eq!(g.dims(), x.dims());
        }
    }
}

#[test]
fn empty_tensors_change_no_observer_state() {
    let data = t2(3, 4);
    for mut obs in all_observers() {
        let name = obs.name();
        for seen in [false, true] {
            if seen {
                obs.observe(&data).unwrap();
            }
            let before = obs.state();
            let before_qp = obs.calculate_qparams().unwrap();
            for x in empty_tensors() {
                obs.observe(&x).unwrap();
                assert_eq!(obs.state(), before, "{name}: {:?}", x.shape());
                assert_eq!(obs.calculate_qparams().unwrap(), before_qp, "{name}");
            }
            if !seen {
                assert_eq!(obs.min_max(), None, "{name}");
                assert_eq!(
                    obs.calculate_qparams().unwrap(),
                    per_tensor(1.0, 0),
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn empty_tensors_pass_through_fake_quantize_modules() {
    let data = t2(3, 4);
    for (name, mut fq) in all_fake_quants() {
        for seen in [false, true] {
            if seen {
                fq.forward(&data).unwrap();
            }
            let before = fq.state();
            for x in empty_tensors() {
                let y = fq
                    .forward(&x)
                    .unwrap_or_else(|e| panic!("{name}, {:?}: {e}", x.shape()));
                assert_eq!(y.dims(), x.dims(), "{name}");
                assert_eq!(y.dtype(), x.dtype(), "{name}");
                assert_eq!(fq.state(), before, "{name}: {:?}", x.shape());
            }
            // Also with the observer off and with fake quant off.
            fq.disable_observer();
            fq.forward(&Tensor::zeros((3, 0), DType::F32, &cpu()).unwrap())
                .unwrap();
            fq.disable_fake_quant();
            fq.forward(&Tensor::zeros((0, 4), DType::F32, &cpu()).unwrap())
                .unwrap();
            fq.enable_observer();
            fq.enable_fake_quant();
            assert_eq!(fq.state(), before, "{name}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// FakeQuantize misuse
// ---------------------------------------------------------------------------------------

#[test]
fn per_channel_fake_quantize_without_observation_is_an_error() {
    for spec in [
        QConfig::default_qat(Backend::X86).weight,
        FakeQuantizeSpec::builder()
            .per_channel(1)
            .observer(ObserverKind::MinMax)
            .build()
            .unwrap(),
    ] {
        let mut fq = spec.build().unwrap();
        fq.disable_observer();
        assert!(fq.fake_quant_enabled());
        let before = fq.state();
        let obs_name = fq.observer().name();
        let axis = fq.observer().ch_axis().unwrap();
        for x in [t2(4, 3), t2(3, 4), Tensor::new(1.0f32, &cpu()).unwrap()] {
            let channels = x.dims().get(axis).copied().unwrap_or(0);
            if channels == 1 {
                continue;
            }
            expect_err(
                fq.forward(&x),
                Kind::QParams,
                &[
                    obs_name,
                    &format!("holds 1 per-channel scales but the input has {channels} channels"),
                ],
                &["let the observer see a batch first"],
            );
            assert_eq!(fq.state(), before);
        }
    }
    // Learnable per channel with a channel count other than the input's.
    let spec = FakeQuantizeSpec::builder()
        .signed(true)
        .symmetric(true)
        .per_channel(0)
        .learnable(true)
        .build()
        .unwrap();
    let mut fq = FakeQuantize::with_channels(&spec, 4).unwrap();
    fq.enable_param_learning();
    expect_err(
        fq.forward(&t2(3, 2)),
        Kind::QParams,
        &["4 scales and 4 zero points, expected 3"],
        &["[C] per channel"],
    );
}

#[test]
fn load_state_with_mismatched_lengths() {
    let data = t2(3, 4);
    for (name, mut fq) in all_fake_quants() {
        fq.forward(&data).unwrap();
        let good = fq.state();
        let n = good.scale.len();
        let fix = ["load a state saved from a fake-quant of the same configuration"];
        // Scales and zero points of different lengths, or none at all.
        let mut bad = good.clone();
        bad.zero_point.push(0.0);
        expect_err(
            fq.load_state(&bad),
            Kind::State,
            &[&format!("{n} scales and {} zero points", n + 1)],
            &fix,
        );
        let mut bad = good.clone();
        bad.scale.clear();
        bad.zero_point.clear();
        expect_err(
            fq.load_state(&bad),
            Kind::State,
            &["0 scales and 0 zero points"],
            &fix,
        );
        // A bad scale.
        let mut bad = good.clone();
        bad.scale[0] = -1.0;
        expect_err(
            fq.load_state(&bad),
            Kind::QParams,
            &["scale -1 is not a finite positive number"],
            &[],
        );
        assert_eq!(fq.state(), good, "{name}");
        fq.load_state(&good).unwrap();
        assert_eq!(fq.state(), good, "{name}");
    }
    // A learnable fake-quant of 3 channels given 2.
    let spec = FakeQuantizeSpec::builder()
        .signed(true)
        .symmetric(true)
        .per_channel(0)
        .learnable(true)
        .build()
        .unwrap();
    let mut fq = FakeQuantize::with_channels(&spec, 3).unwrap();
    let mut bad = fq.state();
    bad.scale = vec![0.1, 0.2];
    bad.zero_point = vec![0.0, 0.0];
    expect_err(
        fq.load_state(&bad),
        Kind::State,
        &["2 scales for a learnable fake-quant of 3"],
        &["same channel count"],
    );
    // An observer state of the wrong shape.
    let mut fq = QConfig::default_qat(Backend::X86)
        .activation
        .build()
        .unwrap();
    let mut bad = fq.state();
    bad.observer = ObserverState {
        min_val: vec![0.0, 1.0],
        max_val: vec![1.0, 2.0],
        histogram: Vec::new(),
    };
    expect_err(
        fq.load_state(&bad),
        Kind::State,
        &["2 min values and 2 max values for a MovingAverageMinMaxObserver"],
        &["same kind of observer"],
    );
    let mut hist = FakeQuantizeSpec::builder()
        .observer(ObserverKind::Histogram { bins: 64 })
        .build()
        .unwrap()
        .build()
        .unwrap();
    hist.forward(&data).unwrap();
    let mut bad = hist.state();
    bad.observer.histogram.pop();
    expect_err(
        hist.load_state(&bad),
        Kind::State,
        &["63 bins, this observer has 64"],
        &["same number of bins"],
    );
}

/// A load that fails must leave the module as it was (the observer included).
#[test]
fn failed_load_state_leaves_the_module_unchanged() {
    let data = t2(3, 4);
    let mut fq = QConfig::default_qat(Backend::X86)
        .activation
        .build()
        .unwrap();
    fq.forward(&data).unwrap();
    let before = fq.state();
    let mut bad = before.clone();
    bad.zero_point = vec![1000.0];
    bad.observer.min_val = vec![-7.0];
    bad.observer.max_val = vec![7.0];
    expect_err(
        fq.load_state(&bad),
        Kind::QParams,
        &["zero point 1000 is outside"],
        &[],
    );
    assert_eq!(fq.state(), before);

    let spec = FakeQuantizeSpec::builder()
        .signed(true)
        .symmetric(true)
        .per_channel(0)
        .learnable(true)
        .build()
        .unwrap();
    let mut fq = FakeQuantize::with_channels(&spec, 3).unwrap();
    fq.forward(&data).unwrap();
    let before = fq.state();
    let bad = FakeQuantizeState {
        scale: vec![0.1, 0.2],
        zero_point: vec![0.0, 0.0],
        observer: ObserverState {
            min_val: vec![-1.0, -2.0],
            max_val: vec![1.0, 2.0],
            histogram: Vec::new(),
        },
        ..before.clone()
    };
    expect_err(fq.load_state(&bad), Kind::State, &["2 scales"], &[]);
    assert_eq!(fq.state(), before);
}

/// Zero points of a non-learnable fake-quant are integers in the range: a saved NaN, infinite
/// or fractional one is corrupt, not something to truncate silently.
#[test]
fn load_state_rejects_non_integer_zero_points() {
    let data = t2(3, 4);
    for bad_zp in [f32::NAN, 3.7] {
        let mut fq = QConfig::default_qat(Backend::X86)
            .activation
            .build()
            .unwrap();
        fq.forward(&data).unwrap();
        let mut bad = fq.state();
        bad.zero_point = vec![bad_zp];
        assert!(
            fq.load_state(&bad).is_err(),
            "zero point {bad_zp} was loaded as {:?}",
            fq.zero_point()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Module paths
// ---------------------------------------------------------------------------------------

#[test]
fn in_module_wraps_the_path_into_the_message() {
    let inner = QDType::new(9, true).unwrap_err();
    let inner_msg = inner.to_string();
    let e = inner.in_module("blocks.0.conv1");
    match &e {
        Error::InModule { path, source } => {
            assert_eq!(path, "blocks.0.conv1");
            assert!(matches!(**source, Error::Config { .. }), "{source:?}");
        }
        other => panic!("expected InModule, got {other:?}"),
    }
    assert_eq!(
        e.to_string(),
        format!("in module `blocks.0.conv1`: {inner_msg}")
    );
    assert!(e.to_string().contains("bit width 9 is outside 2..=8"));
    assert!(e.to_string().contains("choose a width from 2 to 8 bits"));
    assert_eq!(e.source().map(|s| s.to_string()), Some(inner_msg.clone()));

    // Nested paths read outermost first.
    let e = e.in_module("model");
    assert_eq!(
        e.to_string(),
        format!("in module `model`: in module `blocks.0.conv1`: {inner_msg}")
    );

    // Any error can be wrapped, an observer's too.
    let mut obs = MinMaxObserver::new(ObserverConfig::new(
        QDType::QUINT8,
        QScheme::PerTensorAffine,
    ))
    .unwrap();
    let e = obs
        .observe(&t1(&[f32::NAN]))
        .unwrap_err()
        .in_module("head.act");
    let msg = e.to_string();
    assert!(
        msg.starts_with("in module `head.act`: MinMaxObserver rejected its input"),
        "{msg}"
    );
    assert!(msg.contains("feed only finite tensors"), "{msg}");
}

#[test]
fn candle_errors_convert() {
    let e: Error = candle_core::Error::Msg("boom".into()).into();
    assert!(matches!(e, Error::Candle(_)));
    assert_eq!(e.to_string(), "boom");
}

/// PyTorch's `FixedQParamsFakeQuantize` takes its scale and zero point from the observer at
/// construction, so it quantizes with them even when its observer is disabled from the start.
#[test]
fn fixed_qparams_fake_quantize_starts_with_its_fixed_qparams() {
    for (spec, scale, zero_point) in [
        (FakeQuantizeSpec::fixed_sigmoid(), 1.0f32 / 256.0, 0),
        (FakeQuantizeSpec::fixed_tanh(), 2.0 / 256.0, 128),
    ] {
        let mut fq = spec.build().unwrap();
        assert_eq!(fq.qparams(), per_tensor(scale, zero_point));
        fq.disable_observer();
        let y = fq.forward(&t1(&[0.3])).unwrap().to_vec1::<f32>().unwrap();
        let code = (0.3f32 * (1.0 / scale)).round_ties_even();
        assert_eq!(y, vec![code * scale]);
    }
}

#[test]
fn a_state_with_another_scale_count_is_refused_before_anything_changes() {
    let qc = QConfig::default_qat(Backend::X86);
    let x = Tensor::new(&[[0.5f32, -1.0, 0.25], [2.0, 0.1, -0.3]], &cpu()).unwrap();
    // Per-channel weight fake-quant (axis 0) that has seen a 2-channel tensor.
    let mut pc = qc.weight.build().unwrap();
    pc.forward(&x).unwrap();
    let before = pc.state();
    assert_eq!(before.scale.len(), 2);
    // A per-tensor state (one scale, one-channel statistics) into it.
    let mut pt = qc.activation.build().unwrap();
    pt.forward(&x).unwrap();
    let one = pt.state();
    let e = pc.load_state(&one).unwrap_err().to_string();
    assert!(e.contains("1 scales") && e.contains("2 channels"), "{e}");
    assert_eq!(pc.state(), before);
    // Its scale list cut to one channel while its statistics keep two.
    let mut cut = before.clone();
    cut.scale.truncate(1);
    cut.zero_point.truncate(1);
    let e = pc.load_state(&cut).unwrap_err().to_string();
    assert!(e.contains("saved statistics"), "{e}");
    assert_eq!(pc.state(), before);
    // A per-channel state into a per-tensor fake-quant.
    let before_pt = pt.state();
    let e = pt.load_state(&before).unwrap_err().to_string();
    assert!(e.contains("per tensor"), "{e}");
    assert_eq!(pt.state(), before_pt);
    // The matching states load.
    pc.load_state(&before).unwrap();
    pt.load_state(&before_pt).unwrap();
    assert_eq!(pc.state(), before);
}
