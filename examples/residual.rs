//! A small ResNet-style model through candle-qat's pipeline, with per-path qconfigs, and a
//! per-layer quantization-error (SQNR) table.
//!
//! The model: QuantStub -> stem conv+bn+relu -> max pool -> two residual blocks (conv+bn+relu,
//! conv+bn, `FloatFunctional::add_relu` with the block's input) -> max pool -> flatten ->
//! DeQuantStub -> fc1+relu kept in float (`None` qconfig) -> QuantStub -> fc2 -> DeQuantStub.
//! `blocks.1.conv1` gets 4-bit weights; everything else the preset.
//!
//! ```text
//! cargo run --release --example residual                      # 2 float epochs, 1 QAT epoch
//! cargo run --release --example residual -- --data ~/mnist    # full MNIST
//! ```

/// mimalloc: training frees and reallocates the same large buffers every step, which the
/// system allocator hands back to the OS and page-faults in again (the training-step bench
/// measured 42 ms per step with mimalloc against 66 ms with glibc's malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/idx.rs"]
mod idx;
#[path = "common/residual_net.rs"]
mod residual_net;
#[path = "common/trainer.rs"]
mod trainer;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::passes::convert;
use candle_qat::prelude::*;
use clap::Parser;

use idx::Mnist;
use residual_net::{ResNet, Tap, Taps};
use trainer::{AnyResult, EpochPlan, MomentumSgd, Preset, Rng};

/// A residual CNN through float training, PTQ, QAT and int8, with per-path qconfigs.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory with the four MNIST IDX files (gzipped or not); default: the embedded
    /// 5,000-image subset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Float training epochs.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// QAT epochs (at least 1: the observers need to see data; BN statistics and
    /// observers are frozen after them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    qat_epochs: u16,
    /// Quantization preset.
    #[arg(long, value_enum, default_value_t = Preset::X86)]
    preset: Preset,
    /// Seed of weight initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (rayon's global pool and candle's kernels); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Float learning rate (cosine; this net diverges at MnistNet's 0.05).
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    /// QAT learning rate (cosine).
    #[arg(long, default_value_t = 0.005)]
    qat_lr: f64,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Images of the batch the SQNR table is computed on.
    #[arg(long, default_value_t = 256)]
    sqnr_images: usize,
}

fn new_net(dev: &Device) -> AnyResult<(VarMap, ResNet)> {
    let vm = VarMap::new();
    let net = ResNet::new(VarBuilder::from_varmap(&vm, DType::F32, dev))?;
    Ok((vm, net))
}

fn copy_net(from: &VarMap, dev: &Device) -> AnyResult<(VarMap, ResNet)> {
    let (mut vm, net) = new_net(dev)?;
    trainer::copy_varmap(from, &mut vm)?;
    Ok((vm, net))
}

/// Signal-to-quantization-noise ratio of `q` against the reference `f`, in dB.
fn sqnr_db(f: &Tensor, q: &Tensor) -> AnyResult<f64> {
    let f = f.to_dtype(DType::F64)?;
    let q = q.to_dtype(DType::F64)?;
    let signal = f.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let noise = (&f - &q)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok(if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    })
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
    let backend = args.preset.backend();
    let mapping = residual_net::qconfig_mapping(backend)?;

    let data = match &args.data {
        Some(dir) => Mnist::from_dir(dir)?,
        None => Mnist::embedded()?,
    };
    data.check_shape(28, 28)?;
    println!(
        "data: {} ({} train, {} test images); preset {:?}, seed {}",
        data.source, data.train.n, data.test.n, args.preset, args.seed
    );
    let steps = trainer::steps_per_epoch(data.train.n, args.batch_size);
    let run_epochs = |net: &mut ResNet,
                      opt: &mut MomentumSgd,
                      rng: &mut Rng,
                      epochs: usize,
                      lr: f64,
                      what: &str|
     -> AnyResult<()> {
        for epoch in 0..epochs {
            train(net)?;
            let perm = rng.permutation(data.train.n);
            let plan = EpochPlan {
                split: &data.train,
                batch_size: args.batch_size,
                base_lr: lr,
                first_step: epoch * steps,
                total_steps: epochs * steps,
                label: format!("{what} {}/{epochs}", epoch + 1),
            };
            let t = Instant::now();
            let st = trainer::train_epoch(&*net, opt, &plan, &perm, &dev)?;
            println!(
                "{what} epoch {}/{epochs}: loss {:.4}, train acc {:.2}% ({:.1} s)",
                epoch + 1,
                st.mean_loss(),
                100.0 * st.accuracy(),
                t.elapsed().as_secs_f64()
            );
        }
        Ok(())
    };

    // Float.
    let t = Instant::now();
    let (float_vm, mut float_net) = new_net(&dev)?;
    trainer::init_weights(&float_vm, &mut Rng::stream(args.seed, 0))?;
    let mut opt = MomentumSgd::new(float_vm.all_vars(), args.lr, 0.9);
    run_epochs(
        &mut float_net,
        &mut opt,
        &mut Rng::stream(args.seed, 1),
        args.epochs,
        args.lr,
        "float",
    )?;
    eval(&mut float_net)?;
    let float_preds = trainer::predict(&float_net, &data.test, args.batch_size, "float", &dev)?;
    let float_acc = trainer::accuracy(&float_preds, &data.test);
    let float_time = t.elapsed();

    // PTQ: fold BN, calibrate on 512 train images, convert.
    let t = Instant::now();
    let (_ptq_vm, mut ptq) = copy_net(&float_vm, &dev)?;
    eval(&mut ptq)?;
    fuse_modules(&mut ptq)?;
    prepare_qat(&mut ptq, &mapping)?;
    let calib: Vec<usize> = Rng::stream(args.seed, 2)
        .permutation(data.train.n)
        .into_iter()
        .take(512)
        .collect();
    for chunk in calib.chunks(args.batch_size) {
        ptq.forward(&data.train.batch(chunk, &dev)?.0)?;
    }
    disable_observer(&mut ptq)?;
    convert(&mut ptq)?;
    let ptq_preds = trainer::predict(&ptq, &data.test, args.batch_size, "PTQ int8", &dev)?;
    let ptq_acc = trainer::accuracy(&ptq_preds, &data.test);
    let ptq_time = t.elapsed();

    // QAT.
    let t = Instant::now();
    let (qat_vm, mut qat) = copy_net(&float_vm, &dev)?;
    train(&mut qat)?;
    fuse_modules_qat(&mut qat)?;
    prepare_qat(&mut qat, &mapping)?;
    let mut opt = MomentumSgd::new(qat_vm.all_vars(), args.qat_lr, 0.9);
    run_epochs(
        &mut qat,
        &mut opt,
        &mut Rng::stream(args.seed, 3),
        args.qat_epochs as usize,
        args.qat_lr,
        "QAT",
    )?;
    freeze_bn_stats(&mut qat)?;
    disable_observer(&mut qat)?;
    eval(&mut qat)?;
    println!("\nprepared model after QAT:\n{}", summary(&qat)?);
    let fq_preds = trainer::predict(&qat, &data.test, args.batch_size, "QAT fake-quant", &dev)?;
    let fq_acc = trainer::accuracy(&fq_preds, &data.test);
    let mut int8 = qat.clone();
    int8.forward(&data.train.batch(&[0, 1], &dev)?.0)?;
    convert(&mut int8)?;
    let int8_preds = trainer::predict(&int8, &data.test, args.batch_size, "QAT int8", &dev)?;
    let int8_acc = trainer::accuracy(&int8_preds, &data.test);
    let qat_time = t.elapsed();
    println!("converted model:\n{}", summary(&int8)?);

    // Per-layer SQNR: the float model holding the QAT weights (BN with the frozen running
    // statistics, exactly the float function the fake-quant model approximates) against the
    // fake-quant model and the converted one, on the same test batch.
    let (_ref_vm, mut reference) = copy_net(&qat_vm, &dev)?;
    eval(&mut reference)?;
    let idx: Vec<usize> = (0..args.sqnr_images.min(data.test.n)).collect();
    let (x, _) = data.test.batch(&idx, &dev)?;
    let collect = |m: &ResNet| -> AnyResult<Vec<Tap>> {
        let mut v = Vec::new();
        m.forward_taps(&x, &mut Taps(Some(&mut v)))?;
        Ok(v)
    };
    let (f_taps, q_taps, i_taps) = (collect(&reference)?, collect(&qat)?, collect(&int8)?);
    let modules = named_modules(&int8)?;
    let act = |path: &str| {
        modules
            .iter()
            .find(|m| m.path == path)
            .and_then(|m| m.fake_quants.iter().find(|f| f.role == "activation"))
            .map(|f| (f.qparams.scales()[0], f.qparams.zero_points()[0]))
    };
    let qdesc = |label: &str| -> String {
        let path = label.split(' ').next().unwrap_or(label);
        match modules.iter().find(|m| m.path == path) {
            Some(m) => match (
                &m.qconfig,
                m.fake_quants.iter().find(|f| f.role == "weight"),
            ) {
                (None, _) => format!("{} float", m.kind),
                (Some(_), Some(w)) => format!(
                    "{} w{}b",
                    m.kind,
                    32 - ((w.quant_range.1 - w.quant_range.0) as u32).leading_zeros()
                ),
                (Some(_), None) => m.kind.clone(),
            },
            None => "pass-through".to_string(),
        }
    };
    println!(
        "\nper-layer SQNR against the float model (same QAT weights) on {} test images, in dB, \
         cumulative (each output carries the error of the layers before it); higher is better",
        idx.len()
    );
    println!(
        "{:<16} {:<22} {:>12} {:>12}",
        "layer", "module", "fake-quant", "int8"
    );
    for ((f, q), i) in f_taps.iter().zip(&q_taps).zip(&i_taps) {
        let int8_val = match (&i.qsource, i.value.dtype()) {
            (Some(src), DType::U8) => {
                let (s, z) = act(src).ok_or_else(|| format!("no qparams for `{src}`"))?;
                candle_qat::quantized::dequantize(&i.value, s, z)?
            }
            _ => i.value.clone(),
        };
        let fmt = |d: f64| {
            if d.is_infinite() {
                "exact".to_string()
            } else {
                format!("{d:.2}")
            }
        };
        println!(
            "{:<16} {:<22} {:>12} {:>12}",
            f.label,
            qdesc(&f.label),
            fmt(sqnr_db(&f.value, &q.value)?),
            fmt(sqnr_db(&f.value, &int8_val)?)
        );
    }

    let pct = |x: f64| format!("{:.2}%", 100.0 * x);
    println!("\n=== residual net on {} test images ===", data.test.n);
    println!(
        "{:<16} {:>9} {:>16}",
        "model", "accuracy", "agrees w/ float"
    );
    println!("{:<16} {:>9} {:>16}", "float", pct(float_acc), "-");
    for (name, acc, p) in [
        ("PTQ int8", ptq_acc, &ptq_preds),
        ("QAT fake-quant", fq_acc, &fq_preds),
        ("QAT int8", int8_acc, &int8_preds),
    ] {
        println!(
            "{:<16} {:>9} {:>16}",
            name,
            pct(acc),
            pct(trainer::agreement(&float_preds, p))
        );
    }
    println!(
        "QAT fake-quant vs int8 prediction agreement: {}",
        pct(trainer::agreement(&fq_preds, &int8_preds))
    );
    println!(
        "wall time: float {} | PTQ {} | QAT + convert {} | total {}",
        trainer::fmt_duration(float_time),
        trainer::fmt_duration(ptq_time),
        trainer::fmt_duration(qat_time),
        trainer::fmt_duration(total.elapsed())
    );
    Ok(())
}
