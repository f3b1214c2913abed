//! The column matrix of a chunk of images (tap-major or channels-last) and the weights in
//! the matching tap order.

use super::super::matmul::View;
use super::plan::Geom;

/// The weights in the channels-last tap order, per group: `w_cl[o][r] = w[o][tap_major(r)]`.
pub(super) fn weights_cl(w: &[f32], g: &Geom) -> Vec<f32> {
    let rows = g.win.rows();
    let mut out = Vec::with_capacity(w.len());
    for wo in w.chunks_exact(rows) {
        out.extend((0..rows).map(|r| wo[g.win.tap_major(r)]));
    }
    out
}

/// Writes the column matrices of images `n0..n0 + m`, group `gi`, side by side into `col`
/// (`rows x m*cols`).
pub(super) fn chunk_im2col(x: &[f32], g: &Geom, gi: usize, n0: usize, m: usize, col: &mut [f32]) {
    let win = g.win;
    let (hw, cols) = (g.hw(), win.cols());
    for k in 0..m {
        let xg = &x[((n0 + k) * g.c + gi * win.c) * hw..][..win.c * hw];
        win.im2col(xg, &mut col[k * cols..], m * cols);
    }
}

/// The channels-last column matrix of images `n0..n0 + m`, group `gi`, into `colt`
/// (`m*cols x rows`), through the padded channels-last image `xt`.
pub(super) fn chunk_im2col_cl(
    x: &[f32],
    g: &Geom,
    gi: usize,
    n0: usize,
    m: usize,
    colt: &mut [f32],
    xt: &mut [f32],
) {
    let win = g.win;
    let (hw, per) = (g.hw(), win.cols() * win.rows());
    for k in 0..m {
        let xg = &x[((n0 + k) * g.c + gi * win.c) * hw..][..win.c * hw];
        win.pad_channels_last(xg, xt);
        win.im2col_cl(xt, &mut colt[k * per..][..per]);
    }
}

/// The column matrix of images `n0..n0 + m`, group `gi`, as a `rows x m*cols` view: the
/// image itself for a pointwise convolution of one image, else built in `col` (channels-last
/// through `xt`, or tap-major).
pub(super) fn columns<'a>(
    x: &'a [f32],
    g: &Geom,
    gi: usize,
    n0: usize,
    m: usize,
    col: &'a mut [f32],
    xt: &mut [f32],
) -> View<'a> {
    let (win, hw) = (g.win, g.hw());
    if g.pointwise() && m == 1 {
        View::rows(&x[(n0 * g.c + gi * win.c) * hw..][..win.c * hw], win.cols())
    } else if g.channels_last() {
        chunk_im2col_cl(x, g, gi, n0, m, col, xt);
        View::transposed(col, win.rows())
    } else {
        chunk_im2col(x, g, gi, n0, m, col);
        View::rows(col, m * win.cols())
    }
}
