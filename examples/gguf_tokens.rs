//! Decoding speed of GGUF files in candle-transformers' `quantized_llama`: tokens/s of each
//! file fed the embedded tiny-shakespeare validation text one token at a time through its KV
//! cache (batch 1, windows of 64 from position 0), the files measured in turn, `--rounds`
//! times, each file's best round kept. candle fixes its CPU thread count per process: run one
//! process per setting (`RAYON_NUM_THREADS=1`, `=2`).
//!
//! ```sh
//! RAYON_NUM_THREADS=1 cargo run --release --example gguf_tokens -- out/model.gguf out/model_f32.gguf
//! ```

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "common/idx.rs"]
mod idx;
#[path = "common/shakespeare.rs"]
mod shakespeare;
#[path = "common/trainer.rs"]
mod trainer;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, IndexOp};
use candle_transformers::models::quantized_llama::ModelWeights;
use clap::Parser;
use shakespeare::{Corpus, WindowSet, CONTEXT};
use trainer::AnyResult;

#[derive(Parser)]
#[command(about = "tokens/s of GGUF files in candle-transformers' quantized_llama")]
struct Args {
    /// GGUF files (Llama architecture, the tiny-shakespeare vocabulary).
    files: Vec<PathBuf>,
    /// Validation windows of 64 tokens decoded per round.
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// Rounds (each file once per round, in turn).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn load(path: &PathBuf, dev: &Device) -> AnyResult<ModelWeights> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let content = gguf_file::Content::read(&mut f)?;
    Ok(ModelWeights::from_gguf(content, &mut f, dev)?)
}

fn main() -> AnyResult<()> {
    let args = Args::parse();
    if args.files.is_empty() || args.windows == 0 || args.rounds == 0 {
        return Err("give at least one GGUF file, --windows >= 1 and --rounds >= 1".into());
    }
    let dev = Device::Cpu;
    let corpus = Corpus::embedded()?;
    let set = WindowSet::non_overlapping(&corpus.val)?;
    let n = args.windows.min(set.len());
    let (x, _) = set.batch(0..n, &dev)?;
    let models = args
        .files
        .iter()
        .map(|p| load(p, &dev))
        .collect::<AnyResult<Vec<_>>>()?;
    let mut best = vec![0f64; models.len()];
    for _ in 0..args.rounds {
        for (m, b) in models.iter().zip(best.iter_mut()) {
            let t = Instant::now();
            for w in 0..n {
                let mut q = m.clone();
                for p in 0..CONTEXT {
                    q.forward(&x.i((w..w + 1, p..p + 1))?.contiguous()?, p)?;
                }
            }
            *b = b.max((n * CONTEXT) as f64 / t.elapsed().as_secs_f64());
        }
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    for (p, b) in args.files.iter().zip(&best) {
        let bytes = std::fs::metadata(p)?.len();
        println!(
            "{}: {b:.0} tokens/s ({} bytes; RAYON_NUM_THREADS={threads}, best of {} rounds of {n} \
             windows)",
            p.display(),
            bytes,
            args.rounds
        );
    }
    Ok(())
}
