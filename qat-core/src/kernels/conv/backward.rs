//! The backward of the convolution: the input gradient (GEMM then col2im) and the weight
//! gradient (GEMM accumulated per task), each only when asked for.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::super::matmul::{parallelism, sgemm, sgemm_strided, View};
use super::columns::{columns, weights_cl};
use super::plan::{ranges, Geom};
use super::scratch::with_scratch;

/// `v` set to zeros, as initialised values.
pub(super) fn zeroed(v: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    v.fill(MaybeUninit::new(0.0));
    // SAFETY: just initialised; MaybeUninit<f32> has f32's layout.
    unsafe { &mut *(v as *mut [MaybeUninit<f32>] as *mut [f32]) }
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
    let mut dx: Vec<f32> = Vec::with_capacity(if need_dx { g.n * x_image } else { 0 });
    // Each task's slice of dx (its images).
    let mut slices: Vec<Option<&mut [MaybeUninit<f32>]>> = Vec::with_capacity(parts.len());
    if need_dx {
        let mut rest = &mut dx.spare_capacity_mut()[..g.n * x_image];
        for &(a, b) in &parts {
            let (head, tail) = rest.split_at_mut((b - a) * x_image);
            slices.push(Some(head));
            rest = tail;
        }
    } else {
        slices.resize_with(parts.len(), || None);
    }
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
                // SAFETY: dw_part holds all groups' weights; the views lie inside slices.
                unsafe {
                    sgemm_strided(
                        og,
                        rows,
                        ld,
                        dw_part[gi * g.wg()..].as_mut_ptr(),
                        1,
                        og,
                        true,
                        View::rows(dyg, ld),
                        b,
                        par,
                    )
                }
            }
            if let Some(dxp) = dxc.as_deref_mut() {
                let block = |k: usize| (n0 + k - base) * x_image + gi * win.c * hw;
                if m == 1 && pointwise {
                    let dxg = &mut dxp[block(0)..][..win.c * hw];
                    // dx_g (c x hw) = W_g^T (c x og) @ dy_g (og x hw), written whole.
                    // SAFETY: dxg is this group's `c x hw` gradient block.
                    unsafe {
                        sgemm(
                            rows,
                            cols,
                            og,
                            dxg.as_mut_ptr() as *mut f32,
                            cols,
                            false,
                            View::transposed(wg, rows),
                            View::rows(dyg, cols),
                            par,
                        )
                    }
                } else if cl {
                    // dcol^T (ld x rows) = dy_g^T (ld x og) @ W_cl,g (og x rows).
                    // SAFETY: dcol holds `ld x rows`; the views lie inside `dyg` and `wts`.
                    unsafe {
                        sgemm(
                            ld,
                            rows,
                            og,
                            dcol.as_mut_ptr(),
                            rows,
                            false,
                            View::transposed(dyg, ld),
                            View::rows(wg, rows),
                            par,
                        )
                    }
                    let per = cols * rows;
                    for k in 0..m {
                        xt.fill(0.0);
                        win.col2im_cl(&dcol[k * per..][..per], xt);
                        let dxg = zeroed(&mut dxp[block(k)..][..win.c * hw]);
                        win.unpad_channels_last(xt, dxg);
                    }
                } else {
                    // SAFETY: dcol holds `rows x ld`.
                    unsafe {
                        sgemm(
                            rows,
                            ld,
                            og,
                            dcol.as_mut_ptr(),
                            ld,
                            false,
                            View::transposed(wg, rows),
                            View::rows(dyg, ld),
                            par,
                        )
                    }
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
    let jobs = parts.into_iter().zip(slices);
    let dw_parts: Vec<Vec<f32>> = if tasks > 1 {
        jobs.collect::<Vec<_>>()
            .into_par_iter()
            .map(|(r, s)| task(r, s))
            .collect()
    } else {
        jobs.map(|(r, s)| task(r, s)).collect()
    };
    let dx = need_dx.then(|| {
        // SAFETY: the tasks covered every image and wrote each one's whole gradient.
        unsafe { dx.set_len(g.n * x_image) };
        dx
    });
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
