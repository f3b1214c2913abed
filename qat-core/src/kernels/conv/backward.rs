//! The backward of the convolution: the input gradient (GEMM then col2im) and the weight
//! gradient (GEMM accumulated per task), each only when asked for.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::super::matmul::{parallelism, sgemm, Dst, View};
use super::columns::{columns, weights_cl};
use super::plan::{ranges, Geom};
use super::scratch::with_scratch;
use crate::host::alloc_with;

/// `v` set to zeros, as initialised values.
fn zeroed(v: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    v.fill(MaybeUninit::new(0.0));
    // SAFETY: `fill` just initialised every element of `v`.
    unsafe { v.assume_init_mut() }
}

/// The backward: `(dx, dw)`, each only when asked for.
pub(super) fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: &Geom,
    need_dx: bool,
    need_dw: bool,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let win = g.win;
    let (og, rows, cols, hw) = (g.og(), win.rows(), win.cols(), g.hw());
    let (per_chunk, tasks, gemm_threads) = g.plan();
    let par = parallelism(gemm_threads);
    let (pointwise, cl) = (g.pointwise(), g.channels_last());
    let w_cl = if cl && need_dx {
        weights_cl(w, g)
    } else {
        Vec::new()
    };
    let wts: &[f32] = if cl { &w_cl } else { w };
    let x_image = g.c * hw;
    let y_image = g.o * cols;
    let w_len = g.o * rows;
    let parts = ranges(g.n, tasks, per_chunk);
    // The tasks take every image once, in order (dx below relies on it).
    let mut next = 0;
    for &(a, b) in &parts {
        assert!(
            a == next && b >= a,
            "conv2d backward: tasks {parts:?} skip images"
        );
        next = b;
    }
    assert_eq!(next, g.n, "conv2d backward: tasks {parts:?} miss images");
    // Images n0..n0+m of one task; `dxc` its dx slice from image `base`.
    let chunk = |n0: usize,
                 m: usize,
                 dw_part: &mut [f32],
                 dxc: Option<&mut [MaybeUninit<f32>]>,
                 base: usize,
                 s: &mut [&mut [f32]; 4]| {
        let [col, dcol, dyc, xt] = s;
        let ld = m * cols;
        let mut dxc = dxc;
        for gi in 0..g.groups {
            let wg = &wts[gi * g.wg()..][..g.wg()];
            // This group's output gradient for the chunk, `og x ld`.
            let dyg: &[f32] = if m == 1 {
                &dy[(n0 * g.o + gi * og) * cols..][..og * cols]
            } else {
                for o in 0..og {
                    for k in 0..m {
                        dyc[o * ld + k * cols..][..cols].copy_from_slice(
                            &dy[(n0 + k) * y_image + (gi * og + o) * cols..][..cols],
                        );
                    }
                }
                &dyc[..og * ld]
            };
            if need_dw {
                // The column matrix, transposed: `ld x rows`.
                let b = columns(x, g, gi, n0, m, col, xt).t();
                // dW_g (og x rows) += dy_g (og x ld) @ col^T (ld x rows), accumulated
                // transposed (`rows x og` per group, column-major dW_g): the GEMM then packs
                // the smaller dy_g rather than the column matrix.
                let dwg = Dst::strided(&mut dw_part[gi * g.wg()..][..g.wg()], 1, og);
                sgemm(og, rows, ld, dwg, true, View::rows(dyg, ld), b, par);
            }
            if let Some(dxp) = dxc.as_deref_mut() {
                let block = |k: usize| (n0 + k - base) * x_image + gi * win.c * hw;
                if m == 1 && pointwise {
                    let dxg = &mut dxp[block(0)..][..win.c * hw];
                    // dx_g (c x hw) = W_g^T (c x og) @ dy_g (og x hw), written whole.
                    let (wt, dyv) = (View::transposed(wg, rows), View::rows(dyg, cols));
                    sgemm(
                        rows,
                        cols,
                        og,
                        Dst::uninit_rows(dxg, cols),
                        false,
                        wt,
                        dyv,
                        par,
                    );
                } else if cl {
                    // dcol^T (ld x rows) = dy_g^T (ld x og) @ W_cl,g (og x rows).
                    let (dyt, wv) = (View::transposed(dyg, ld), View::rows(wg, rows));
                    sgemm(ld, rows, og, Dst::rows(dcol, rows), false, dyt, wv, par);
                    let per = cols * rows;
                    for k in 0..m {
                        xt.fill(0.0);
                        win.col2im_cl(&dcol[k * per..][..per], xt);
                        let dxg = zeroed(&mut dxp[block(k)..][..win.c * hw]);
                        win.unpad_channels_last(xt, dxg);
                    }
                } else {
                    let (wt, dyv) = (View::transposed(wg, rows), View::rows(dyg, ld));
                    sgemm(rows, ld, og, Dst::rows(dcol, ld), false, wt, dyv, par);
                    for k in 0..m {
                        let dxg = zeroed(&mut dxp[block(k)..][..win.c * hw]);
                        win.col2im(&dcol[k * cols..], ld, dxg);
                    }
                }
            }
        }
    };
    let lens = [
        if need_dw { rows * cols * per_chunk } else { 0 },
        if need_dx { rows * cols * per_chunk } else { 0 },
        og * cols * per_chunk,
        if cl { win.padded_len() } else { 0 },
    ];
    let task = |(a, b): (usize, usize), mut dxs: Option<&mut [MaybeUninit<f32>]>| {
        let mut dw_part = if need_dw {
            vec![0f32; w_len]
        } else {
            Vec::new()
        };
        with_scratch(lens, |s| {
            let mut n0 = a;
            while n0 < b {
                let m = per_chunk.min(b - n0);
                chunk(n0, m, &mut dw_part, dxs.as_deref_mut(), a, s);
                n0 += m;
            }
        });
        dw_part
    };
    // Runs every task, each on its images' slice of dx (when asked for); the weight-gradient
    // partials come back in task order.
    let mut dw_parts: Vec<Vec<f32>> = Vec::new();
    let fill = |dx: &mut [MaybeUninit<f32>]| {
        let mut slices: Vec<Option<&mut [MaybeUninit<f32>]>> = Vec::with_capacity(parts.len());
        if need_dx {
            let mut rest = dx;
            for &(a, b) in &parts {
                let (head, tail) = rest.split_at_mut((b - a) * x_image);
                slices.push(Some(head));
                rest = tail;
            }
        } else {
            slices.resize_with(parts.len(), || None);
        }
        let jobs = parts.iter().copied().zip(slices);
        dw_parts = if tasks > 1 {
            jobs.collect::<Vec<_>>()
                .into_par_iter()
                .map(|(r, s)| task(r, s))
                .collect()
        } else {
            jobs.map(|(r, s)| task(r, s)).collect()
        };
    };
    // SAFETY: with `need_dx`, `fill` hands the tasks consecutive slices covering all `n`
    // images (the tasks' ranges partition `0..n`, asserted above), each task runs chunks over
    // all of its images, and a chunk writes every image's gradient whole: per group its
    // `c x hw` block, by the GEMM (pointwise, one image) or `zeroed` then col2im. Without
    // `need_dx` the vector is empty.
    let dx = unsafe { alloc_with(if need_dx { g.n * x_image } else { 0 }, fill) };
    let dx = need_dx.then_some(dx);
    let dw = need_dw.then(|| {
        // Sum the task partials (in task order), then transpose each group's `rows x og`
        // block back to the weight's `og x rows` (and its taps back to the weight's order
        // when the column matrix was channels-last).
        let mut it = dw_parts.into_iter();
        let mut acc = it.next().unwrap_or_else(|| vec![0f32; w_len]);
        for p in it {
            for (a, b) in acc.iter_mut().zip(&p) {
                *a += b;
            }
        }
        let mut dw = vec![0f32; w_len];
        for (dst, src) in dw.chunks_mut(g.wg()).zip(acc.chunks(g.wg())) {
            for o in 0..og {
                for r in 0..rows {
                    let t = if cl { win.tap_major(r) } else { r };
                    dst[o * rows + t] = src[r * og + o];
                }
            }
        }
        dw
    });
    (dx, dw)
}
