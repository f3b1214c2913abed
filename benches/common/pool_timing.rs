// Criterion timing inside a rayon pool (included by path).
#![allow(dead_code)]

use std::hint::black_box;
use std::time::Instant;

use criterion::Bencher;
use rayon::ThreadPool;

/// A local rayon pool of one thread.
pub fn one_thread_pool() -> ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("rayon pool")
}

/// Times `f` with each measurement batch run inside `pool` (one `install` per batch, so the
/// hop onto the pool is not part of the per-iteration time).
pub fn time_in_pool<T>(b: &mut Bencher<'_>, pool: &ThreadPool, mut f: impl FnMut() -> T + Send) {
    b.iter_custom(|iters| {
        pool.install(|| {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(f());
            }
            start.elapsed()
        })
    })
}
