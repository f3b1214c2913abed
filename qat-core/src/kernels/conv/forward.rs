//! The forward of the convolution: per chunk of images and group, the column matrix then
//! one GEMM.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::super::matmul::{parallelism, sgemm, Dst, View};
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
        // Whole images only: every one of them gets all its `O x cols` outputs below.
        assert_eq!(yc.len(), m * per_image, "conv2d: a chunk of partial images");
        for gi in 0..g.groups {
            let wg = View::rows(&wts[gi * g.wg()..][..g.wg()], rows);
            let b = columns(x, g, gi, n0, m, col, xt);
            if m == 1 {
                // This image's `O x cols` outputs, group `gi` its rows `gi*og..(gi+1)*og`.
                let yg = Dst::uninit_rows(&mut yc[gi * og * cols..][..og * cols], cols);
                sgemm(og, cols, rows, yg, false, wg, b, par);
            } else {
                sgemm(og, ld, rows, Dst::rows(out, ld), false, wg, b, par);
                for k in 0..m {
                    for o in 0..og {
                        let dst = &mut yc[k * per_image + (gi * og + o) * cols..][..cols];
                        dst.write_copy_of_slice(&out[o * ld + k * cols..][..cols]);
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
    let fill = |spare: &mut [MaybeUninit<f32>]| {
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
    };
    // SAFETY: the chunks partition the output into runs of whole images (asserted in
    // `chunk`), and a chunk writes every output of its images: each group's `og x cols`
    // rows per image, by the GEMM (one image) or the copy from `out` (several).
    unsafe { alloc_with(total, fill) }
}
