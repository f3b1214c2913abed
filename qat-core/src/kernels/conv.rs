//! Conv2d (and Conv1d as a conv2d of height 1) on CPU f32 tensors as one candle `CustomOp2` on
//! (input, weight) with its own backward:
//!
//! - forward: per image and group, im2col then `y = W (O/g, C/g*KH*KW) @ col`;
//! - input gradient: `dcol = W^T @ dy`, then col2im (skipped when the input needs no
//!   gradient, e.g. the network's input);
//! - weight gradient: `dW += dy @ col^T`, accumulated per task and summed.
//!
//! Images are processed in chunks whose output maps, side by side, give the GEMMs at least
//! `TARGET_COLS` columns (small maps such as 7x7 would otherwise make thin, slow GEMMs).
//! Chunks are spread over rayon tasks (single-threaded GEMMs) when there are enough of them
//! for the threads, else each chunk's GEMMs run multi-threaded. Weight-gradient partial sums
//! are kept per task and added in task order, so results do not depend on scheduling.
//! 1x1 convolutions of stride 1 and no padding skip im2col for single-image chunks.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::Window;
use super::matmul::{parallelism, sgemm, sgemm_strided, View};
use super::num_threads;
use super::sums::sum_f64;
use crate::host::{alloc_with, cpu_f32_slice, with_cpu_f32 as cpu_f32};

/// Multiply-adds below which a convolution runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 16;
/// Multiply-adds of one chunk's GEMM above which it is worth splitting across threads.
const GEMM_PAR_MIN_MACS: usize = 1 << 20;
/// Columns (output positions, all images of a chunk) a GEMM should get at least.
const TARGET_COLS: usize = 512;
/// Input channels per group from which the channels-last column matrix is used (see
/// `Window::im2col_cl`): its rows copy runs of `kw * c` values, the tap-major matrix's runs
/// are output rows (7 values in MnistNet's conv3), so the tap-major one wins only for few
/// channels (MnistNet's conv1 has one).
const CL_MIN_CHANNELS: usize = 8;

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
struct Geom {
    n: usize,
    /// Input channels (all groups).
    c: usize,
    /// Output channels (all groups).
    o: usize,
    groups: usize,
    /// Per group: input channels, kernel, output map.
    win: Window,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], p: &Conv2dParams) -> candle_core::Result<Geom> {
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

    fn og(&self) -> usize {
        self.o / self.groups
    }
    fn hw(&self) -> usize {
        self.win.h * self.win.w
    }
    /// Weight elements of one group.
    fn wg(&self) -> usize {
        self.og() * self.win.rows()
    }
    /// Whether the column matrix is channels-last (`cols x rows`, taps in `(kernel row,
    /// kernel column, channel)` order, weights permuted to match) rather than tap-major.
    fn channels_last(&self) -> bool {
        !self.pointwise() && self.win.c >= CL_MIN_CHANNELS
    }
    /// No im2col needed: the image is its own column matrix.
    fn pointwise(&self) -> bool {
        let w = &self.win;
        w.kh == 1 && w.kw == 1 && w.stride == [1, 1] && w.pad == [0, 0]
    }
    fn out_shape(&self) -> [usize; 4] {
        [self.n, self.o, self.win.oh, self.win.ow]
    }
    fn macs_per_image(&self) -> usize {
        self.o * self.win.rows() * self.win.cols()
    }

    /// How to split the work: `(images per chunk, tasks, threads of each GEMM)`; tasks take
    /// contiguous runs of chunks.
    fn plan(&self) -> (usize, usize, usize) {
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

/// Scratch buffers reused across calls on each thread.
#[derive(Default)]
struct Scratch {
    /// Column matrix of a chunk.
    col: Vec<f32>,
    /// Its gradient.
    dcol: Vec<f32>,
    /// Output (or output gradient) of a chunk, images side by side.
    out: Vec<f32>,
    /// One image, padded and channels-last (or its gradient).
    xt: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch buffers, sized `[col, dcol, out, xt]`. The buffers
/// are taken out of the thread-local while `f` runs, so a nested call gets fresh ones.
fn with_scratch<R>(lens: [usize; 4], f: impl FnOnce(&mut [&mut [f32]; 4]) -> R) -> R {
    let mut s = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    for (v, len) in [&mut s.col, &mut s.dcol, &mut s.out, &mut s.xt]
        .into_iter()
        .zip(lens)
    {
        if v.len() < len {
            v.resize(len, 0.0);
        }
    }
    let r = f(&mut [
        &mut s.col[..lens[0]],
        &mut s.dcol[..lens[1]],
        &mut s.out[..lens[2]],
        &mut s.xt[..lens[3]],
    ]);
    SCRATCH.with(|t| *t.borrow_mut() = s);
    r
}

/// The weights in the channels-last tap order, per group: `w_cl[o][r] = w[o][tap_major(r)]`.
fn weights_cl(w: &[f32], g: &Geom) -> Vec<f32> {
    let rows = g.win.rows();
    let mut out = Vec::with_capacity(w.len());
    for wo in w.chunks_exact(rows) {
        out.extend((0..rows).map(|r| wo[g.win.tap_major(r)]));
    }
    out
}

/// Splits `0..n` into `tasks` contiguous ranges of near-equal length, each a multiple of
/// `align` (but the last).
fn ranges(n: usize, tasks: usize, align: usize) -> Vec<(usize, usize)> {
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

/// Writes the column matrices of images `n0..n0 + m`, group `gi`, side by side into `col`
/// (`rows x m*cols`).
fn chunk_im2col(x: &[f32], g: &Geom, gi: usize, n0: usize, m: usize, col: &mut [f32]) {
    let win = g.win;
    let (hw, cols) = (g.hw(), win.cols());
    for k in 0..m {
        let xg = &x[((n0 + k) * g.c + gi * win.c) * hw..][..win.c * hw];
        win.im2col(xg, &mut col[k * cols..], m * cols);
    }
}

/// The channels-last column matrix of images `n0..n0 + m`, group `gi`, into `colt`
/// (`m*cols x rows`), through the padded channels-last image `xt`.
fn chunk_im2col_cl(
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
fn columns<'a>(
    x: &'a [f32],
    g: &Geom,
    gi: usize,
    n0: usize,
    m: usize,
    col: &'a mut [f32],
    xt: &mut [f32],
) -> View {
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

/// `v` set to zeros, as initialised values.
fn zeroed(v: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    v.fill(MaybeUninit::new(0.0));
    // SAFETY: just initialised; MaybeUninit<f32> has f32's layout.
    unsafe { &mut *(v as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// The forward: `y (N, O, OH, OW)`.
fn forward(x: &[f32], w: &[f32], g: &Geom) -> Vec<f32> {
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

/// The backward: `(dx, dw)`, each only when asked for.
fn backward(
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

/// The conv2d op on (input, weight); both contiguous CPU f32.
struct Conv2dOp(Conv2dParams);

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    cpu_f32_slice(s, l, &format!("conv2d: {what}"))
}

/// The forward of both conv ops on (input, weight): the geometry and the output.
fn conv_fwd(
    p: &Conv2dParams,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(Geom, Vec<f32>)> {
    let g = Geom::new(l1.dims(), l2.dims(), p)?;
    let x = f32_slice(s1, l1, "input")?;
    let w = f32_slice(s2, l2, "weight")?;
    Ok((g, forward(x, w, &g)))
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "qat-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, y) = conv_fwd(&self.0, s1, l1, s2, l2)?;
        Ok((CpuStorage::F32(y), Shape::from(g.out_shape().to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // An input that is neither a variable nor computed from one gets no gradient (candle
        // would drop it anyway): conv1's input gradient is never computed.
        let (need_dx, need_dw) = (x.track_op(), w.track_op());
        if !need_dx && !need_dw {
            return Ok((None, None));
        }
        let g = Geom::new(x.dims(), w.dims(), &self.0)?;
        let dy = dy.to_dtype(DType::F32)?.contiguous()?;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let res = cpu_f32(&x, |xs| {
            cpu_f32(&w, |ws| {
                cpu_f32(&dy, |dys| backward(xs, ws, dys, &g, need_dx, need_dw))
            })
        });
        let Some(Some(Some((dx, dw)))) = res else {
            candle_core::bail!("conv2d backward: tensors are not CPU f32");
        };
        let dev = x.device();
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        let dw = dw
            .map(|v| Tensor::from_vec(v, w.shape(), dev))
            .transpose()?;
        Ok((dx, dw))
    }
}

/// Elements per rayon task in the bias passes.
const BIAS_CHUNK: usize = 1 << 15;

/// Adds `b[o]` to every run of `cols` outputs of channel `o` in `y` (`(N, O, cols)`).
fn add_bias(y: &mut [f32], b: &[f32], cols: usize) {
    let o = b.len();
    if cols == 0 || o == 0 {
        return;
    }
    y.par_chunks_mut(cols)
        .enumerate()
        .with_min_len((BIAS_CHUNK / cols).max(1))
        .for_each(|(r, run)| {
            let v = b[r % o];
            run.iter_mut().for_each(|y| *y += v);
        });
}

/// The bias gradient: per-channel sums of `dy` (`(N, O, cols)`), in f64.
fn bias_grad(dy: &[f32], o: usize, cols: usize) -> Vec<f32> {
    let mut sums = vec![0f64; o];
    if cols == 0 || o == 0 {
        return vec![0.0; o];
    }
    let runs: Vec<f64> = dy
        .par_chunks(cols)
        .with_min_len((BIAS_CHUNK / cols).max(1))
        .map(sum_f64)
        .collect();
    for (r, v) in runs.into_iter().enumerate() {
        sums[r % o] += v;
    }
    sums.into_iter().map(|v| v as f32).collect()
}

/// The conv2d op with a bias on (input, weight, bias `[O]`): the bias is added in place to
/// the convolution's output and its gradient summed from the output gradient, without the
/// extra node (and candle's zero-fill and add on its gradient edge) of a separate add.
struct Conv2dBiasOp(Conv2dParams);

impl CustomOp3 for Conv2dBiasOp {
    fn name(&self) -> &'static str {
        "qat-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = f32_slice(s3, l3, "bias")?;
        let o = l2.dims().first().copied().unwrap_or(0);
        if b.len() != o {
            candle_core::bail!("conv2d: {} bias values for {o} output channels", b.len());
        }
        let (g, mut y) = conv_fwd(&self.0, s1, l1, s2, l2)?;
        add_bias(&mut y, b, g.win.cols());
        Ok((CpuStorage::F32(y), Shape::from(g.out_shape().to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = CustomOp2::bwd(&Conv2dOp(self.0), x, w, y, dy)?;
        if !b.track_op() {
            return Ok((dx, dw, None));
        }
        let g = Geom::new(x.dims(), w.dims(), &self.0)?;
        let dy = dy.to_dtype(DType::F32)?.contiguous()?;
        let Some(db) = cpu_f32(&dy, |d| bias_grad(d, g.o, g.win.cols())) else {
            candle_core::bail!("conv2d backward: the output gradient is not CPU f32");
        };
        Ok((dx, dw, Some(Tensor::from_vec(db, b.shape(), b.device())?)))
    }
}

/// Whether the fused kernels take these tensors (CPU, f32, non-empty).
pub(crate) fn supported(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.elem_count() > 0
        && w.elem_count() > 0
}

/// 2-D convolution of `x (N, C, H, W)` with `w (O, C/groups, KH, KW)`, no bias; gradients
/// flow to both. CPU f32 tensors only (see [`supported`]).
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, p: Conv2dParams) -> candle_core::Result<Tensor> {
    Geom::new(x.dims(), w.dims(), &p)?;
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2dOp(p))
}

/// [`conv2d`] plus a bias `b (O,)`, in one op; gradients flow to all three.
pub(crate) fn conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    p: Conv2dParams,
) -> candle_core::Result<Tensor> {
    Geom::new(x.dims(), w.dims(), &p)?;
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2dBiasOp(p))
}

/// 1-D convolution of `x (N, C, L)` with `w (O, C/groups, K)`: a conv2d of height 1 (padding
/// along the length only).
pub(crate) fn conv1d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    let (n, c, l) = x.dims3()?;
    let (o, cg, k) = w.dims3()?;
    let p = Conv2dParams {
        pad: [0, padding],
        stride: [1, stride],
        dilation: [1, dilation],
        groups,
    };
    let (x, w) = (x.reshape((n, c, 1, l))?, w.reshape((o, cg, 1, k))?);
    let y = match b {
        Some(b) => conv2d_bias(&x, &w, b, p)?,
        None => conv2d(&x, &w, p)?,
    };
    let ol = y.dim(3)?;
    y.reshape((n, o, ol))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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
                                    if iy < 0
                                        || ix < 0
                                        || iy >= win.h as isize
                                        || ix >= win.w as isize
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
    fn check_direct(
        n: usize,
        c: usize,
        o: usize,
        h: usize,
        wd: usize,
        k: [usize; 2],
        p: Conv2dParams,
    ) {
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
                            assert!(
                                geom.unwrap().channels_last() == (k > 1 || stride > 1 || pad > 0)
                            );
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
}
