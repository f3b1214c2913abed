//! The forward of the convolution: per chunk of images and group, the column matrix then
//! one GEMM.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::super::matmul::{parallelism, sgemm, View};
use super::columns::{columns, weights_cl};
use super::plan::Geom;
use super::scratch::with_scratch;
use crate::host::alloc_with;

/// The forward: `y (N, O, OH, OW)`.
pub(super) fn forward(x: &[f32], w: &[f32], g: &Geom) -> Vec<f32> {
    let win = g.win;
    let (og, rows, cols) = (g.og(), win.rows(), win.cols());
    let per_image = g.o * cols;
    let total = g.n * per_image;
    let (per_chunk, tasks, gemm_threads) = g.plan();
    let par = parallelism(gemm_threads);
    let cl = g.channels_last();
    let w_cl = if cl { weights_cl(w, g) } else { Vec::new() };
    let wts: &[f32] = if cl { &w_cl } else { w };
    // One chunk: images n0.., outputs `yc` (m images).
    let chunk = |n0: usize, yc: &mut [MaybeUninit<f32>], s: &mut [&mut [f32]; 4]| {
        let m = yc.len() / per_image;
        let ld = m * cols;
        let [col, _, out, xt] = s;
        for gi in 0..g.groups {
            let wg = View::rows(&wts[gi * g.wg()..], rows);
            let b = columns(x, g, gi, n0, m, col, xt);
            if m == 1 {
                // SAFETY: `yc` holds this image's `O x cols` outputs, group `gi` its rows
                // `gi*og..(gi+1)*og`; the views lie inside `wts` and the column matrix.
                unsafe {
                    sgemm(
                        og,
                        cols,
                        rows,
                        yc[gi * og * cols..].as_mut_ptr() as *mut f32,
                        cols,
                        false,
                        wg,
                        b,
                        par,
                    )
                }
            } else {
                // SAFETY: `out` holds `og x ld`; the views lie inside `wts` and `col`.
                unsafe { sgemm(og, ld, rows, out.as_mut_ptr(), ld, false, wg, b, par) }
                for k in 0..m {
                    for o in 0..og {
                        let dst = &mut yc[k * per_image + (gi * og + o) * cols..][..cols];
                        for (d, &v) in dst.iter_mut().zip(&out[o * ld + k * cols..][..cols]) {
                            d.write(v);
                        }
                    }
                }
            }
        }
    };
    let lens = [
        rows * cols * per_chunk,
        0,
        og * cols * per_chunk,
        if cl { win.padded_len() } else { 0 },
    ];
    let run = |(c, yc): (usize, &mut [MaybeUninit<f32>])| {
        with_scratch(lens, |s| chunk(c * per_chunk, yc, s))
    };
    // Every chunk writes all of its images' `O x cols` outputs.
    alloc_with(total, |spare| {
        if tasks > 1 {
            spare
                .par_chunks_mut(per_chunk * per_image)
                .enumerate()
                .for_each(run);
        } else {
            spare
                .chunks_mut(per_chunk * per_image)
                .enumerate()
                .for_each(run);
        }
    })
}
