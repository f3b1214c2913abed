//! The second main job: a tiny Llama (4 blocks, width 128, 820k parameters) trained on
//! tiny-shakespeare in float, quantized post-training (PTQ), recovered with QAT, converted,
//! exported to GGUF and run in candle-transformers' `quantized_llama`, with the PyTorch
//! reference's recipe (`../shared/reference/tinyllama_qat.py`); the pipeline is
//! `examples/common/shakespeare_job.rs`.
//!
//! ```text
//! cargo run --release --example shakespeare_qat                         # q4_0, seed 0
//! cargo run --release --example shakespeare_qat -- --scheme int3-g32 --seed 1
//! cargo run --release --example shakespeare_qat -- --out out/llama      # checkpoints, model.gguf
//! cargo run --release --example shakespeare_qat -- --out out/llama --resume --scheme q8_0
//! ```

/// mimalloc, kept from handing freed memory back: every step frees and reallocates the same
/// activation-sized buffers (see examples/common/alloc.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/fused_adamw.rs"]
mod fused_adamw;
#[path = "common/idx.rs"]
mod idx;
#[path = "common/lm_training.rs"]
mod lm_training;
#[path = "common/shakespeare.rs"]
mod shakespeare;
#[path = "common/shakespeare_job.rs"]
mod shakespeare_job;
#[path = "common/tiny_llama.rs"]
mod tiny_llama;
#[path = "common/trainer.rs"]
mod trainer;

use std::path::PathBuf;

use candle_core::Device;
use clap::Parser;

use shakespeare_job::{JobConfig, SchemeArg};
use trainer::AnyResult;

/// Float training, PTQ, QAT and GGUF deployment of a tiny Llama on tiny-shakespeare.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Quantization scheme of every Linear (q4_0 and q8_0 convert and export to GGUF;
    /// 8da4w and int3-g32 have no GGUF type and stay in fake-quant form).
    #[arg(long, value_enum, default_value_t = SchemeArg::Q4_0)]
    scheme: SchemeArg,
    /// Seed of weight initialisation and of the training batches (the evaluation windows
    /// are the same for every seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (rayon's pool and candle's kernels); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Float training steps (warm-up 100, cosine 3e-3 -> 3e-4).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(1..))]
    float_steps: u32,
    /// QAT steps, and the float control's (3e-4 cosine to 3e-5).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
    qat_steps: u32,
    /// Write float.safetensors (the float VarMap), qat_<scheme>.safetensors (qat-core's QAT
    /// checkpoint), model.gguf (the deployed model) and model_f32.gguf (the same model in
    /// F32) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Load float.safetensors from --out instead of training in float.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Validation windows of the final figures (default: the whole split, 1,742).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    final_windows: Option<u32>,
    /// Progress evaluation every this many steps (0: none).
    #[arg(long, default_value_t = 250)]
    eval_every: usize,
    /// Characters of each greedy sample.
    #[arg(long, default_value_t = 200)]
    sample_chars: usize,
    /// Train with candle_nn::AdamW instead of the fused AdamW (same values, slower).
    #[arg(long)]
    candle_adamw: bool,
}

fn main() {
    alloc::keep_freed_memory();
    let args = Args::parse();
    let pool = match trainer::thread_pool(args.threads) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = pool.install(|| run(args)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> AnyResult<()> {
    let cfg = JobConfig {
        float_steps: args.float_steps as usize,
        qat_steps: args.qat_steps as usize,
        out: args.out,
        resume: args.resume,
        final_windows: args.final_windows.map(|n| n as usize),
        eval_every: args.eval_every,
        sample_chars: args.sample_chars,
        candle_adamw: args.candle_adamw,
        ..JobConfig::default_for(args.scheme, args.seed)
    };
    let report = shakespeare_job::run(&cfg, &Device::Cpu)?;
    report.print();
    Ok(())
}
