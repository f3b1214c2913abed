// The thread pools of the benches (included by path), pinned so that a measurement "at n
// threads" runs every part of every variant, ours and the baselines, on n threads.
//
// What runs where in candle 0.11.1 (candle-core's `utils.rs` and `cpu_backend`):
// - candle's elementwise ops (unary and binary maps of 64Ki elements or more: a bias add, a
//   ReLU, autograd's gradient sums) run on candle's own barrier pool, built once per process
//   at its first use with `CANDLE_NUM_THREADS` threads (else `RAYON_NUM_THREADS`, else the
//   physical cores), whatever rayon pool the caller is in;
// - candle's matmul runs the `gemm` crate with `Parallelism::Rayon(n)`, `n` read from
//   `RAYON_NUM_THREADS` (else the physical cores) at every call, on the caller's rayon pool;
// - candle's conv2d and our kernels (qat-core) split their work on the caller's rayon pool.
// So one process can only measure one thread count honestly: `pin` sets both variables and
// builds the rayon pool every measured call runs in; `one_count_per_process` runs a bench
// that measures several counts once per count, in child processes.
#![allow(dead_code)]

/// The environment variable that hands a child process its thread count.
const CHILD: &str = "QAT_BENCH_THREADS";

/// Pins the pools of this process to `n` threads (see the file's comment) and returns the
/// rayon pool to run every measured call in (`pool.install`). Call it first in `main`,
/// before any candle op: candle's barrier pool takes its size at its first use.
///
/// Panics when `CANDLE_NUM_THREADS` is set to another count: candle's elementwise ops
/// would then run on another number of threads than the rest.
pub fn pin(n: usize) -> rayon::ThreadPool {
    pin_env(n);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap_or_else(|e| panic!("building the bench's rayon pool of {n} threads: {e}"))
}

/// Sets `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` to `n` (see [`pin`]).
fn pin_env(n: usize) {
    assert!(n >= 1, "a bench needs at least one thread");
    if let Some(c) = std::env::var_os("CANDLE_NUM_THREADS") {
        assert!(
            c.to_str() == Some(n.to_string().as_str()),
            "CANDLE_NUM_THREADS={c:?} differs from the bench's {n} threads: unset it or set \
             RAYON_NUM_THREADS to the same count"
        );
    }
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
}

/// As [`pin`], but the calling thread becomes one of the pool's `n` threads (rayon's
/// `use_current_thread`): rayon calls made from it run in the pool without `install`, so a
/// measured call at 1 thread runs entirely on the calling thread (no hand-over to a pool
/// thread), as onnxruntime runs on its caller. Keep the pool alive while measuring.
pub fn pin_current(n: usize) -> rayon::ThreadPool {
    pin_env(n);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .use_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("building the bench's rayon pool of {n} threads: {e}"))
}

/// The thread count of a bench that measures one count per run: `RAYON_NUM_THREADS`, else
/// candle's default (the physical cores, which rayon's own default of logical CPUs is not).
pub fn from_env() -> usize {
    match std::env::var("RAYON_NUM_THREADS") {
        Ok(s) => s
            .parse()
            .ok()
            .filter(|&n: &usize| n >= 1)
            .unwrap_or_else(|| panic!("RAYON_NUM_THREADS={s:?} is not a thread count >= 1")),
        Err(_) => candle_core::utils::get_num_threads(),
    }
}

/// For a bench that measures each of `counts`: in the parent process, runs this binary
/// again for each count (same arguments, `QAT_BENCH_THREADS` set), exits with the first
/// failing child's status, and returns `None` once all succeeded; in a child, returns its
/// count (to pass to [`pin`]). `QAT_BENCH_THREADS=n` set by hand runs that count alone.
pub fn one_count_per_process(counts: &[usize]) -> Option<usize> {
    if let Some(s) = std::env::var_os(CHILD) {
        let n = s
            .to_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{CHILD}={s:?} is not a thread count"));
        return Some(n);
    }
    let exe = std::env::current_exe().expect("the bench binary's path");
    for &n in counts {
        let status = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env(CHILD, n.to_string())
            .status()
            .unwrap_or_else(|e| panic!("running the bench at {n} threads: {e}"));
        if !status.success() {
            eprintln!("the bench at {n} threads failed: {status}");
            std::process::exit(status.code().unwrap_or(1));
        }
    }
    None
}
