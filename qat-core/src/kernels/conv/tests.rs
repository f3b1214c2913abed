//! The convolution kernels against candle's ops and direct loops in f64.

use candle_core::{DType, Device, Tensor, Var};

use super::plan::{Conv2dParams, Geom, CL_MIN_CHANNELS};
use super::{conv1d, conv2d, conv2d_bias};

/// Tolerance: |got - want| <= TOL * (1 + max |want|) (f32 sums in different orders).
const TOL: f32 = 1e-5;

fn close(what: &str, got: &Tensor, want: &Tensor) {
    crate::kernels::assert_close(what, got, want, TOL)
}

/// Direct loops in f64: `(y, dx, dw)` of `y = conv(x, w)` for the upstream gradient `r`.
fn direct(
    x: &Tensor,
    w: &Tensor,
    r: Option<&Tensor>,
    p: Conv2dParams,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let g = Geom::new(x.dims(), w.dims(), &p).unwrap();
    let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let ws: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let win = g.win;
    let (og, hw) = (g.og(), g.hw());
    let ys_len = g.n * g.o * win.cols();
    let rs: Vec<f32> = match r {
        Some(r) => r.flatten_all().unwrap().to_vec1().unwrap(),
        None => vec![0.0; ys_len],
    };
    let mut y = vec![0f64; ys_len];
    let mut dx = vec![0f64; xs.len()];
    let mut dw = vec![0f64; ws.len()];
    for n in 0..g.n {
        for o in 0..g.o {
            let gi = o / og;
            for oy in 0..win.oh {
                for ox in 0..win.ow {
                    let yi = ((n * g.o + o) * win.oh + oy) * win.ow + ox;
                    for ci in 0..win.c {
                        for i in 0..win.kh {
                            for j in 0..win.kw {
                                let iy = (oy * p.stride[0] + i * p.dilation[0]) as isize
                                    - p.pad[0] as isize;
                                let ix = (ox * p.stride[1] + j * p.dilation[1]) as isize
                                    - p.pad[1] as isize;
                                if iy < 0 || ix < 0 || iy >= win.h as isize || ix >= win.w as isize
                                {
                                    continue;
                                }
                                let xi = (n * g.c + gi * win.c + ci) * hw
                                    + iy as usize * win.w
                                    + ix as usize;
                                let wi = ((o * win.c + ci) * win.kh + i) * win.kw + j;
                                y[yi] += xs[xi] as f64 * ws[wi] as f64;
                                dx[xi] += ws[wi] as f64 * rs[yi] as f64;
                                dw[wi] += xs[xi] as f64 * rs[yi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect();
    (f(y), f(dx), f(dw))
}

fn close_vec(what: &str, got: &Tensor, want: &[f32]) {
    let t = Tensor::from_slice(want, got.dims(), got.device()).unwrap();
    close(what, got, &t)
}

/// Forward and both gradients against direct loops (any shape, per-dim options).
fn check_direct(n: usize, c: usize, o: usize, h: usize, wd: usize, k: [usize; 2], p: Conv2dParams) {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1., (n, c, h, wd), &dev).unwrap();
    let w = Var::randn(0f32, 1., (o, c / p.groups, k[0], k[1]), &dev).unwrap();
    let ours = conv2d(x.as_tensor(), w.as_tensor(), p).unwrap();
    let r = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
    let (y, dx, dw) = direct(x.as_tensor(), w.as_tensor(), Some(&r), p);
    let what = format!("n{n} c{c} o{o} {h}x{wd} k{k:?} {p:?}");
    close_vec(&format!("y {what}"), &ours, &y);
    let gr = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    close_vec(&format!("dx {what}"), gr.get(&x).unwrap(), &dx);
    close_vec(&format!("dw {what}"), gr.get(&w).unwrap(), &dw);
}

/// Forward and both gradients against candle's conv2d, on every option mix, with a
/// random upstream gradient (loss = sum(y * r)).
fn check2d(n: usize, c: usize, o: usize, h: usize, wd: usize, k: usize, p: Conv2dParams) {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1., (n, c, h, wd), &dev).unwrap();
    let w = Var::randn(0f32, 1., (o, c / p.groups, k, k), &dev).unwrap();
    let ours = conv2d(x.as_tensor(), w.as_tensor(), p).unwrap();
    let theirs = x
        .as_tensor()
        .conv2d(
            w.as_tensor(),
            p.pad[0],
            p.stride[0],
            p.dilation[0],
            p.groups,
        )
        .unwrap();
    let what = format!("n{n} c{c} o{o} {h}x{wd} k{k} {p:?}");
    close(&format!("y {what}"), &ours, &theirs);
    let vars = [("dx", &x), ("dw", &w)];
    crate::kernels::assert_same_grads(&what, &ours, &theirs, &vars, TOL);
}

/// The conv op with a bias equals our conv plus a broadcast add, values and gradients of
/// input, weight and bias, in 2-D and 1-D, with groups and strides; and a constant bias
/// (not a variable) gets no gradient.
#[test]
fn conv_with_bias_matches_conv_plus_add() {
    let dev = Device::Cpu;
    for (n, c, o, h, wd, k, p) in [
        (2, 4, 6, 7, 6, 3, Conv2dParams::square(1, 1, 1, 1)),
        (3, 4, 4, 9, 9, 3, Conv2dParams::square(1, 2, 1, 2)),
        (1, 2, 3, 1, 11, 1, Conv2dParams::square(0, 1, 1, 1)),
        (64, 2, 8, 12, 12, 3, Conv2dParams::square(1, 1, 2, 1)),
    ] {
        let x = Var::randn(0f32, 1., (n, c, h, wd), &dev).unwrap();
        let w = Var::randn(0f32, 1., (o, c / p.groups, k, k), &dev).unwrap();
        let b = Var::randn(0f32, 1., o, &dev).unwrap();
        let ours = conv2d_bias(x.as_tensor(), w.as_tensor(), b.as_tensor(), p).unwrap();
        let plain = conv2d(x.as_tensor(), w.as_tensor(), p).unwrap();
        let theirs = plain
            .broadcast_add(&b.as_tensor().reshape((1, o, 1, 1)).unwrap())
            .unwrap();
        let what = format!("n{n} c{c} o{o} {h}x{wd} k{k} {p:?}");
        close(&format!("y {what}"), &ours, &theirs);
        let vars = [("dx", &x), ("dw", &w), ("db", &b)];
        let (r, g2) = crate::kernels::assert_same_grads(&what, &ours, &theirs, &vars, TOL);
        // 1-D: the same op on height-1 maps.
        if h == 1 {
            let x1 = x.as_tensor().squeeze(2).unwrap();
            let w1 = w.as_tensor().squeeze(2).unwrap();
            let y1 = conv1d(&x1, &w1, Some(b.as_tensor()), 0, 1, 1, 1).unwrap();
            close(&format!("1d {what}"), &y1, &theirs.squeeze(2).unwrap());
        }
        // A constant bias: no gradient for it, the others unchanged.
        let cb = b.as_tensor().detach();
        let y = conv2d_bias(x.as_tensor(), w.as_tensor(), &cb, p).unwrap();
        let g3 = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g3.get(&cb).is_none());
        close(
            &format!("dw const-b {what}"),
            g3.get(&w).unwrap(),
            g2.get(&w).unwrap(),
        );
    }
}

/// A deterministic pseudo-random `pick(k)` in `0..k` (an LCG), for test shapes.
fn picker(mut seed: u64) -> impl FnMut(usize) -> usize {
    move |k| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize % k
    }
}

#[test]
fn conv2d_matches_candle_on_all_options() {
    let mut pick = picker(12345);
    for batch in [1, 3] {
        for groups in [1, 2, 4] {
            for k in [1, 3, 5] {
                for stride in [1, 2] {
                    for pad in [0, 1, 2] {
                        for dil in [1, 2] {
                            let c = groups * (1 + pick(3));
                            let o = groups * (1 + pick(3));
                            let p = Conv2dParams::square(pad, stride, dil, groups);
                            let h = dil * (k - 1) + 1 + pick(6);
                            let w = dil * (k - 1) + 1 + pick(6);
                            // candle's conv2d backward takes the output padding of its
                            // transposed convolution from the height alone, so it is
                            // compared on square maps; direct loops check any map.
                            check2d(batch, c, o, h, h, k, p);
                            check_direct(batch, c, o, h, w, [k, k], p);
                        }
                    }
                }
            }
        }
    }
}

/// The channels-last path (8 or more input channels per group) on every option mix,
/// against candle (square maps) and the direct loops (any map).
#[test]
fn channels_last_path_matches_candle_on_all_options() {
    let mut pick = picker(777);
    for groups in [1, 2] {
        for k in [1, 3, 5] {
            for stride in [1, 2, 3] {
                for pad in [0, 1, 2] {
                    for dil in [1, 2] {
                        let c = groups * (CL_MIN_CHANNELS + pick(9));
                        let o = groups * (1 + pick(4));
                        let p = Conv2dParams::square(pad, stride, dil, groups);
                        let h = dil * (k - 1) + 1 + pick(7);
                        let w = dil * (k - 1) + 1 + pick(7);
                        let n = 1 + pick(3);
                        let geom = Geom::new(&[n, c, h, w], &[o, c / groups, k, k], &p);
                        assert!(geom.unwrap().channels_last() == (k > 1 || stride > 1 || pad > 0));
                        check2d(n, c, o, h, h, k, p);
                        check_direct(n, c, o, h, w, [k, k], p);
                    }
                }
            }
        }
    }
    check_direct(
        2,
        16,
        6,
        7,
        11,
        [3, 2],
        Conv2dParams {
            pad: [2, 0],
            stride: [2, 1],
            dilation: [1, 2],
            groups: 2,
        },
    );
}

/// Different options per dim and rectangular kernels (conv1d uses them).
#[test]
fn conv2d_per_dim_options_match_direct_loops() {
    for (k, p) in [
        (
            [1, 3],
            Conv2dParams {
                pad: [0, 1],
                stride: [1, 2],
                dilation: [1, 1],
                groups: 1,
            },
        ),
        (
            [3, 2],
            Conv2dParams {
                pad: [2, 0],
                stride: [2, 1],
                dilation: [1, 2],
                groups: 2,
            },
        ),
        (
            [2, 5],
            Conv2dParams {
                pad: [1, 2],
                stride: [3, 1],
                dilation: [2, 1],
                groups: 1,
            },
        ),
    ] {
        check_direct(2, 4, 6, 7, 11, k, p);
        check_direct(1, 2, 2, 1 + 2 * k[0], 9, k, p);
    }
}

/// Larger shapes that take the multi-threaded paths (batch split and threaded GEMMs).
#[test]
fn conv2d_matches_candle_on_large_shapes() {
    check2d(8, 16, 32, 14, 14, 3, Conv2dParams::square(1, 2, 1, 1));
    check2d(1, 64, 64, 24, 24, 3, Conv2dParams::square(1, 1, 1, 1));
    check2d(6, 32, 64, 12, 12, 1, Conv2dParams::square(0, 1, 1, 2));
}

/// Conv1d: value against candle's conv1d, gradients against direct loops (candle 0.11's
/// conv1d backward disagrees with the loops, and with its own conv2d, on three of these
/// four cases: weight gradients with padding or dilation, both for one input channel).
#[test]
fn conv1d_matches_candle() {
    let dev = Device::Cpu;
    for (n, c, o, l, k, pad, stride, dil) in [
        (2, 3, 4, 11, 3, 1, 1, 1),
        (1, 2, 5, 9, 5, 2, 2, 1),
        (3, 4, 2, 13, 3, 0, 2, 2),
        (2, 1, 3, 7, 1, 0, 1, 1),
    ] {
        let x = Var::randn(0f32, 1., (n, c, l), &dev).unwrap();
        let w = Var::randn(0f32, 1., (o, c, k), &dev).unwrap();
        let ours = conv1d(x.as_tensor(), w.as_tensor(), None, pad, stride, dil, 1).unwrap();
        let theirs = x
            .as_tensor()
            .conv1d(w.as_tensor(), pad, stride, dil, 1)
            .unwrap();
        close("y1d", &ours, &theirs);
        let r = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let p = Conv2dParams {
            pad: [0, pad],
            stride: [1, stride],
            dilation: [1, dil],
            groups: 1,
        };
        let (_, dx, dw) = direct(
            &x.as_tensor().unsqueeze(2).unwrap(),
            &w.as_tensor().unsqueeze(2).unwrap(),
            Some(&r.unsqueeze(2).unwrap()),
            p,
        );
        close_vec("dx1d", g1.get(&x).unwrap(), &dx);
        close_vec("dw1d", g1.get(&w).unwrap(), &dw);
    }
}

/// A plain input tensor (no variable upstream) gets no gradient, and the weight's is
/// unchanged by skipping it.
#[test]
fn input_gradient_skipped_for_plain_inputs() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 3, 8, 8), &dev).unwrap();
    let w = Var::randn(0f32, 1., (4, 3, 3, 3), &dev).unwrap();
    let p = Conv2dParams::square(1, 1, 1, 1);
    let g = conv2d(&x, w.as_tensor(), p)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&x).is_none());
    let want = x
        .conv2d(w.as_tensor(), 1, 1, 1, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    close("dw", g.get(&w).unwrap(), want.get(&w).unwrap());
}

#[test]
fn bad_shapes_are_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 3, 2, 2), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap();
    assert!(conv2d(&x, &w, Conv2dParams::square(0, 1, 1, 1)).is_err());
    assert!(conv2d(&x, &w, Conv2dParams::square(0, 1, 1, 2)).is_err());
    assert!(conv2d(&x, &w, Conv2dParams::square(1, 1, 1, 1)).is_ok());
}
