//! im2col / col2im for one image and one channel group, in two layouts:
//!
//! - tap-major: one row per (channel, kernel row, kernel column) tap, in the weight's order,
//!   and one column per output position (row-major over the output map): the forward
//!   convolution is then `weight (O, C*KH*KW) @ col`;
//! - channels-last (`*_cl`, for 8 or more channels): one row per output position, taps in
//!   (kernel row, kernel column, channel) order, built from the image padded and transposed to
//!   channels-last; the convolution is `weight_cl @ colt^T` with the weight's taps permuted.

use super::transpose::transpose;

/// The geometry of one 2-D convolution (per spatial dim: padding, stride, dilation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    /// Input channels of one group.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub pad: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
}

impl Window {
    /// Output positions per image.
    pub fn cols(&self) -> usize {
        self.oh * self.ow
    }

    /// Rows of the column matrix (taps per output position).
    pub fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// The output indices `o` in `0..out` whose input index `o * stride + off - pad` lies in
    /// `0..len`, as a range (`off` is the tap's offset `k * dilation`).
    fn valid(off: usize, pad: usize, stride: usize, len: usize, out: usize) -> (usize, usize) {
        // o * stride + off >= pad
        let lo = if pad > off {
            (pad - off).div_ceil(stride)
        } else {
            0
        };
        // o * stride + off < len + pad
        let hi = if len + pad > off {
            (len + pad - off).div_ceil(stride)
        } else {
            0
        };
        (lo.min(out), hi.min(out).max(lo.min(out)))
    }

    /// Calls `f(tap, rows_lo, rows_hi, cols_lo, cols_hi, x_start)` for each tap `(ci, i, j)`
    /// (its row of the column matrix): output rows `rows_lo..rows_hi` and columns
    /// `cols_lo..cols_hi` read the input inside the image, output `(y, o)` of that block
    /// reading `x[x_start + (y - rows_lo) * stride_h * w + (o - cols_lo) * stride_w]`; every
    /// other output of the tap reads padding.
    #[inline(always)]
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize, usize, usize, usize)) {
        let [ph, pw] = self.pad;
        let [sh, sw] = self.stride;
        let [dh, dw] = self.dilation;
        for ci in 0..self.c {
            for i in 0..self.kh {
                let (ylo, yhi) = Self::valid(i * dh, ph, sh, self.h, self.oh);
                for j in 0..self.kw {
                    let tap = (ci * self.kh + i) * self.kw + j;
                    let (xlo, xhi) = Self::valid(j * dw, pw, sw, self.w, self.ow);
                    if ylo >= yhi || xlo >= xhi {
                        f(tap, 0, 0, 0, 0, 0);
                        continue;
                    }
                    let iy = ylo * sh + i * dh - ph;
                    let ix = xlo * sw + j * dw - pw;
                    f(tap, ylo, yhi, xlo, xhi, (ci * self.h + iy) * self.w + ix);
                }
            }
        }
    }

    /// Fills the `rows() x cols()` column matrix of the group's input `x` (`c x h x w`) into
    /// `col`, whose rows are `ld` apart (`ld >= cols()`: several images side by side).
    pub fn im2col(&self, x: &[f32], col: &mut [f32], ld: usize) {
        let (ow, cols) = (self.ow, self.cols());
        let (sh, sw, w) = (self.stride[0], self.stride[1], self.w);
        assert!(ld >= cols && x.len() >= self.c * self.h * w);
        assert!(self.rows() == 0 || col.len() >= (self.rows() - 1) * ld + cols);
        self.for_each_tap(|tap, ylo, yhi, xlo, xhi, x0| {
            let out = &mut col[tap * ld..][..cols];
            out[..ylo * ow].fill(0.0);
            out[yhi * ow..].fill(0.0);
            let n = xhi - xlo;
            for y in ylo..yhi {
                let row = &mut out[y * ow..(y + 1) * ow];
                for v in &mut row[..xlo] {
                    *v = 0.0;
                }
                for v in &mut row[xhi..] {
                    *v = 0.0;
                }
                let src = x0 + (y - ylo) * sh * w;
                let dst = &mut row[xlo..xhi];
                // `for_each_tap` keeps every read inside the image.
                match sw {
                    1 => dst.copy_from_slice(&x[src..src + n]),
                    2 => {
                        // Pairs, so that the even elements gather as vector shuffles.
                        let s = &x[src..src + 2 * n - 1];
                        let (head, last) = dst.split_at_mut(n - 1);
                        for (d, p) in head.iter_mut().zip(s.chunks_exact(2)) {
                            *d = p[0];
                        }
                        last[0] = s[2 * n - 2];
                    }
                    _ => {
                        let s = &x[src..src + (n - 1) * sw + 1];
                        for (k, d) in dst.iter_mut().enumerate() {
                            *d = s[k * sw];
                        }
                    }
                }
            }
        });
    }

    /// Adds the column matrix `col` (rows `ld` apart) back onto the group's input gradient
    /// `dx` (`c x h x w`): the adjoint of [`Window::im2col`]. `dx` must be initialised.
    pub fn col2im(&self, col: &[f32], ld: usize, dx: &mut [f32]) {
        let (ow, cols) = (self.ow, self.cols());
        let (sh, sw, w) = (self.stride[0], self.stride[1], self.w);
        assert!(ld >= cols && dx.len() >= self.c * self.h * w);
        assert!(self.rows() == 0 || col.len() >= (self.rows() - 1) * ld + cols);
        self.for_each_tap(|tap, ylo, yhi, xlo, xhi, x0| {
            let inp = &col[tap * ld..][..cols];
            let n = xhi - xlo;
            for y in ylo..yhi {
                let g = &inp[y * ow + xlo..y * ow + xhi];
                let dst = x0 + (y - ylo) * sh * w;
                match sw {
                    1 => {
                        for (d, &v) in dx[dst..dst + n].iter_mut().zip(g) {
                            *d += v;
                        }
                    }
                    2 => {
                        let d = &mut dx[dst..dst + 2 * n - 1];
                        let (head, last) = g.split_at(n - 1);
                        for (p, &v) in d.chunks_exact_mut(2).zip(head) {
                            p[0] += v;
                        }
                        d[2 * n - 2] += last[0];
                    }
                    _ => {
                        let d = &mut dx[dst..dst + (n - 1) * sw + 1];
                        for (k, &v) in g.iter().enumerate() {
                            d[k * sw] += v;
                        }
                    }
                }
            }
        });
    }
}

/// The channels-last column matrix: one row per output position, `rows()` taps per row in
/// `(kernel row, kernel column, channel)` order. Built from the image in channels-last
/// order with its padding written out (`padded_rows() x padded_cols() x c`), so that the taps
/// of one kernel row are one contiguous run of `kw * c` values (with dilation 1) and a row of
/// the matrix is `kh` copies: with 16 or more channels this is several times faster than the
/// tap-major matrix, whose rows are as short as the output map's rows.
impl Window {
    /// Rows of the padded input that some tap reads.
    pub fn padded_rows(&self) -> usize {
        (self.oh - 1) * self.stride[0] + (self.kh - 1) * self.dilation[0] + 1
    }

    /// Columns of the padded input that some tap reads.
    pub fn padded_cols(&self) -> usize {
        (self.ow - 1) * self.stride[1] + (self.kw - 1) * self.dilation[1] + 1
    }

    /// Length of the padded channels-last image.
    pub fn padded_len(&self) -> usize {
        self.padded_rows() * self.padded_cols() * self.c
    }

    /// Index in the tap-major order `(channel, kernel row, kernel column)` of tap `r` of the
    /// channels-last order `(kernel row, kernel column, channel)`.
    pub fn tap_major(&self, r: usize) -> usize {
        let (ij, ci) = (r / self.c, r % self.c);
        ci * self.kh * self.kw + ij
    }

    /// Writes the group's input `x` (`c x h x w`) into `xt` (`padded_len()`), channels last,
    /// zeros where the taps read padding.
    pub fn pad_channels_last(&self, x: &[f32], xt: &mut [f32]) {
        let (c, h, w) = (self.c, self.h, self.w);
        let (hp, wp) = (self.padded_rows(), self.padded_cols());
        let [ph, pw] = self.pad;
        assert!(x.len() >= c * h * w && xt.len() >= hp * wp * c);
        for r in 0..hp {
            let row = &mut xt[r * wp * c..(r + 1) * wp * c];
            let Some(iy) = r.checked_sub(ph).filter(|&iy| iy < h) else {
                row.fill(0.0);
                continue;
            };
            // Input columns pw..pw + w of the padded row hold the image.
            let lo = pw.min(wp);
            let hi = (pw + w).min(wp);
            row[..lo * c].fill(0.0);
            row[hi * c..].fill(0.0);
            transpose(&x[iy * w..], h * w, &mut row[lo * c..hi * c], c, c, hi - lo);
        }
    }

    /// Writes the channels-last column rows of the image whose padded channels-last input is
    /// `xt` into `colt`, one row of `rows()` values per output position.
    pub fn im2col_cl(&self, xt: &[f32], colt: &mut [f32]) {
        let (c, kw) = (self.c, self.kw);
        let (k, wp) = (self.rows(), self.padded_cols());
        let [sh, sw] = self.stride;
        let [dh, dw] = self.dilation;
        assert!(colt.len() >= self.cols() * k && xt.len() >= self.padded_len());
        let run = kw * c;
        for (p, out) in colt.chunks_exact_mut(k).take(self.cols()).enumerate() {
            let (y, o) = (p / self.ow, p % self.ow);
            for i in 0..self.kh {
                let src = ((y * sh + i * dh) * wp + o * sw) * c;
                let dst = &mut out[i * run..(i + 1) * run];
                if dw == 1 {
                    dst.copy_from_slice(&xt[src..src + run]);
                } else {
                    for (j, d) in dst.chunks_exact_mut(c).enumerate() {
                        d.copy_from_slice(&xt[src + j * dw * c..][..c]);
                    }
                }
            }
        }
    }

    /// Adds the channels-last column rows `dcolt` back onto the padded channels-last input
    /// gradient `dxt`: the adjoint of [`Window::im2col_cl`]. `dxt` must be initialised.
    pub fn col2im_cl(&self, dcolt: &[f32], dxt: &mut [f32]) {
        let (c, kw) = (self.c, self.kw);
        let (k, wp) = (self.rows(), self.padded_cols());
        let [sh, sw] = self.stride;
        let [dh, dw] = self.dilation;
        assert!(dcolt.len() >= self.cols() * k && dxt.len() >= self.padded_len());
        let run = kw * c;
        for (p, inp) in dcolt.chunks_exact(k).take(self.cols()).enumerate() {
            let (y, o) = (p / self.ow, p % self.ow);
            for i in 0..self.kh {
                let dst = ((y * sh + i * dh) * wp + o * sw) * c;
                let g = &inp[i * run..(i + 1) * run];
                if dw == 1 {
                    for (d, &v) in dxt[dst..dst + run].iter_mut().zip(g) {
                        *d += v;
                    }
                } else {
                    for (j, gj) in g.chunks_exact(c).enumerate() {
                        let d = &mut dxt[dst + j * dw * c..][..c];
                        for (d, &v) in d.iter_mut().zip(gj) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }

    /// The group's input gradient `dx` (`c x h x w`, written whole) from the padded
    /// channels-last gradient `dxt`: its padding dropped, input cells no tap reads zero.
    pub fn unpad_channels_last(&self, dxt: &[f32], dx: &mut [f32]) {
        let (c, h, w) = (self.c, self.h, self.w);
        let (hp, wp) = (self.padded_rows(), self.padded_cols());
        let [ph, pw] = self.pad;
        assert!(dx.len() >= c * h * w && dxt.len() >= hp * wp * c);
        // Input columns read by some tap: the first `n`.
        let n = wp.saturating_sub(pw).min(w);
        for iy in 0..h {
            let r = iy + ph;
            let valid = if r < hp { n } else { 0 };
            if valid > 0 {
                let row = &dxt[(r * wp + pw) * c..];
                transpose(row, c, &mut dx[iy * w..], h * w, valid, c);
            }
            for ci in 0..c {
                dx[(ci * h + iy) * w..][valid..w].fill(0.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(len: usize, k: usize, p: usize, s: usize, d: usize) -> usize {
        (len + 2 * p - d * (k - 1) - 1) / s + 1
    }

    /// The window of a `k x k` kernel with the same padding, stride and dilation on both dims.
    fn square(c: usize, h: usize, w: usize, k: usize, p: usize, s: usize, d: usize) -> Window {
        Window {
            c,
            h,
            w,
            kh: k,
            kw: k,
            oh: out(h, k, p, s, d),
            ow: out(w, k, p, s, d),
            pad: [p, p],
            stride: [s, s],
            dilation: [d, d],
        }
    }

    /// im2col against the definition, and col2im as its adjoint (<col2im(g), x> == <g,
    /// im2col(x)>) on every option mix.
    #[test]
    fn im2col_matches_definition_and_col2im_is_its_adjoint() {
        for (c, h, w, k, p, s, d) in [
            (1, 5, 6, 3, 1, 1, 1),
            (2, 7, 5, 3, 0, 2, 1),
            (3, 6, 6, 3, 2, 2, 2),
            (2, 4, 9, 5, 2, 1, 1),
            (1, 8, 3, 1, 0, 2, 1),
            (2, 9, 9, 3, 1, 3, 2),
        ] {
            let win = square(c, h, w, k, p, s, d);
            let x: Vec<f32> = (0..c * h * w).map(|i| (i as f32 * 0.7).sin()).collect();
            // Two images side by side (leading dimension > cols): the second half stays NaN.
            let ld = 2 * win.cols();
            let mut wide = vec![f32::NAN; win.rows() * ld];
            win.im2col(&x, &mut wide, ld);
            let col: Vec<f32> = wide
                .chunks(ld)
                .flat_map(|r| {
                    assert!(r[win.cols()..].iter().all(|v| v.is_nan()));
                    r[..win.cols()].to_vec()
                })
                .collect();
            for ci in 0..c {
                for i in 0..k {
                    for j in 0..k {
                        for y in 0..win.oh {
                            for xx in 0..win.ow {
                                let iy = (y * s + i * d) as isize - p as isize;
                                let ix = (xx * s + j * d) as isize - p as isize;
                                let want =
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        0.0
                                    } else {
                                        x[(ci * h + iy as usize) * w + ix as usize]
                                    };
                                let got =
                                    col[((ci * k + i) * k + j) * win.cols() + y * win.ow + xx];
                                assert_eq!(got, want, "{c} {h} {w} {k} {p} {s} {d}");
                            }
                        }
                    }
                }
            }
            let g: Vec<f32> = (0..col.len()).map(|i| (i as f32 * 0.3).cos()).collect();
            let mut dx = vec![0f32; x.len()];
            win.col2im(&g, win.cols(), &mut dx);
            let lhs: f64 = dx.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let rhs: f64 = g.iter().zip(&col).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!((lhs - rhs).abs() < 1e-4 * (1.0 + rhs.abs()), "{lhs} {rhs}");
        }
    }

    /// The channels-last column matrix holds the tap-major one's values (rows and columns
    /// swapped, taps reordered by `tap_major`), and `col2im_cl` + `unpad_channels_last` is the
    /// adjoint of `pad_channels_last` + `im2col_cl`, on every option mix.
    #[test]
    fn channels_last_matches_tap_major_and_is_adjoint() {
        for (c, h, w, k, p, s, d) in [
            (3, 5, 6, 3, 1, 1, 1),
            (2, 7, 5, 3, 0, 2, 1),
            (3, 6, 6, 3, 2, 2, 2),
            (2, 4, 9, 5, 2, 1, 1),
            (4, 8, 3, 1, 0, 2, 1),
            (2, 9, 9, 3, 1, 3, 2),
            (5, 10, 7, 2, 0, 3, 1),
        ] {
            let win = square(c, h, w, k, p, s, d);
            let x: Vec<f32> = (0..c * h * w).map(|i| (i as f32 * 0.7).sin()).collect();
            let (rows, cols) = (win.rows(), win.cols());
            let mut col = vec![f32::NAN; rows * cols];
            win.im2col(&x, &mut col, cols);
            let mut xt = vec![f32::NAN; win.padded_len()];
            win.pad_channels_last(&x, &mut xt);
            let mut colt = vec![f32::NAN; rows * cols];
            win.im2col_cl(&xt, &mut colt);
            for pos in 0..cols {
                for r in 0..rows {
                    assert_eq!(
                        colt[pos * rows + r],
                        col[win.tap_major(r) * cols + pos],
                        "{c} {h} {w} {k} {p} {s} {d}: position {pos}, tap {r}"
                    );
                }
            }
            let g: Vec<f32> = (0..colt.len()).map(|i| (i as f32 * 0.3).cos()).collect();
            let mut dxt = vec![0f32; win.padded_len()];
            win.col2im_cl(&g, &mut dxt);
            let mut dx = vec![f32::NAN; x.len()];
            win.unpad_channels_last(&dxt, &mut dx);
            let lhs: f64 = dx.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let rhs: f64 = g
                .iter()
                .zip(&colt)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            assert!((lhs - rhs).abs() < 1e-4 * (1.0 + rhs.abs()), "{lhs} {rhs}");
        }
    }
}
