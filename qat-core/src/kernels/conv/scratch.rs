//! The per-thread scratch buffers of the convolution kernels.

use std::cell::RefCell;

/// Scratch buffers reused across calls on each thread.
#[derive(Default)]
pub(super) struct Scratch {
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
pub(super) fn with_scratch<R>(lens: [usize; 4], f: impl FnOnce(&mut [&mut [f32]; 4]) -> R) -> R {
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
