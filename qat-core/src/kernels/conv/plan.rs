//! How a convolution is split: its options, its shapes per group and the chunks and tasks
//! its images are spread over.

use super::super::im2col::Window;
use super::super::num_threads;

/// Multiply-adds below which a convolution runs on the calling thread.
pub(super) const PAR_MIN_MACS: usize = 1 << 16;
/// Multiply-adds of one chunk's GEMM above which it is worth splitting across threads.
pub(super) const GEMM_PAR_MIN_MACS: usize = 1 << 20;
/// Columns (output positions, all images of a chunk) a GEMM should get at least.
pub(super) const TARGET_COLS: usize = 512;
/// Input channels per group from which the channels-last column matrix is used (see
/// `Window::im2col_cl`): its rows copy runs of `kw * c` values, the tap-major matrix's runs
/// are output rows (7 values in MnistNet's conv3), so the tap-major one wins only for few
/// channels (MnistNet's conv1 has one).
pub(super) const CL_MIN_CHANNELS: usize = 8;

/// Convolution options per spatial dim (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Conv2dParams {
    pub pad: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl Conv2dParams {
    /// The same padding, stride and dilation along both dims.
    pub fn square(padding: usize, stride: usize, dilation: usize, groups: usize) -> Self {
        Conv2dParams {
            pad: [padding; 2],
            stride: [stride; 2],
            dilation: [dilation; 2],
            groups,
        }
    }
}

/// Shapes of one convolution.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geom {
    pub n: usize,
    /// Input channels (all groups).
    pub c: usize,
    /// Output channels (all groups).
    pub o: usize,
    pub groups: usize,
    /// Per group: input channels, kernel, output map.
    pub win: Window,
}

impl Geom {
    pub(super) fn new(x: &[usize], w: &[usize], p: &Conv2dParams) -> candle_core::Result<Geom> {
        let (&[n, c, h, wd], &[o, cg, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d: input {x:?} and weight {w:?} must be 4-D");
        };
        let g = p.groups;
        if g == 0 || c % g != 0 || o % g != 0 || c / g != cg {
            candle_core::bail!("conv2d: input {x:?} and weight {w:?} do not match with {g} groups");
        }
        if p.stride.contains(&0) || p.dilation.contains(&0) || kh == 0 || kw == 0 {
            candle_core::bail!("conv2d: stride, dilation and kernel size must be >= 1");
        }
        let out = |len: usize, k: usize, d: usize| -> candle_core::Result<usize> {
            let (pad, s, dil) = (p.pad[d], p.stride[d], p.dilation[d]);
            let span = dil * (k - 1) + 1;
            if len + 2 * pad < span {
                candle_core::bail!(
                    "conv2d: kernel {k} (dilation {dil}) does not fit input {len} with padding {pad}"
                );
            }
            Ok((len + 2 * pad - span) / s + 1)
        };
        let win = Window {
            c: cg,
            h,
            w: wd,
            kh,
            kw,
            oh: out(h, kh, 0)?,
            ow: out(wd, kw, 1)?,
            pad: p.pad,
            stride: p.stride,
            dilation: p.dilation,
        };
        Ok(Geom {
            n,
            c,
            o,
            groups: g,
            win,
        })
    }

    pub(super) fn og(&self) -> usize {
        self.o / self.groups
    }
    pub(super) fn hw(&self) -> usize {
        self.win.h * self.win.w
    }
    /// Weight elements of one group.
    pub(super) fn wg(&self) -> usize {
        self.og() * self.win.rows()
    }
    /// Whether the column matrix is channels-last (`cols x rows`, taps in `(kernel row,
    /// kernel column, channel)` order, weights permuted to match) rather than tap-major.
    pub(super) fn channels_last(&self) -> bool {
        !self.pointwise() && self.win.c >= CL_MIN_CHANNELS
    }
    /// No im2col needed: the image is its own column matrix.
    pub(super) fn pointwise(&self) -> bool {
        let w = &self.win;
        w.kh == 1 && w.kw == 1 && w.stride == [1, 1] && w.pad == [0, 0]
    }
    pub(super) fn out_shape(&self) -> [usize; 4] {
        [self.n, self.o, self.win.oh, self.win.ow]
    }
    pub(super) fn macs_per_image(&self) -> usize {
        self.o * self.win.rows() * self.win.cols()
    }

    /// How to split the work: `(images per chunk, tasks, threads of each GEMM)`; tasks take
    /// contiguous runs of chunks.
    pub(super) fn plan(&self) -> (usize, usize, usize) {
        let threads = num_threads();
        let cols = self.win.cols().max(1);
        let mut per_chunk = TARGET_COLS.div_ceil(cols).clamp(1, self.n.max(1));
        if threads > 1 {
            // Enough chunks to keep every thread busy.
            per_chunk = per_chunk.min(self.n.div_ceil(threads)).max(1);
        }
        let chunks = self.n.div_ceil(per_chunk);
        let total = self.n * self.macs_per_image();
        if threads == 1 || total < PAR_MIN_MACS {
            (per_chunk, 1, 1)
        } else if chunks >= threads || total / chunks.max(1) < GEMM_PAR_MIN_MACS {
            (per_chunk, chunks.min(threads), 1)
        } else {
            (per_chunk, 1, threads)
        }
    }
}

/// Splits `0..n` into `tasks` contiguous ranges of near-equal length, each a multiple of
/// `align` (but the last).
pub(super) fn ranges(n: usize, tasks: usize, align: usize) -> Vec<(usize, usize)> {
    let units = n.div_ceil(align.max(1));
    let tasks = tasks.clamp(1, units.max(1));
    (0..tasks)
        .map(|t| {
            let a = (t * units / tasks * align).min(n);
            let b = ((t + 1) * units / tasks * align).min(n);
            (a, b)
        })
        .collect()
}
