//! The tiny-shakespeare data and training utilities of the examples (examples/common/
//! shakespeare.rs, lm_training.rs) against the PyTorch reference's numbers
//! (../shared/reference/tinyllama_qat.py: `load_data`, `windows`, `fixed_eval_set`, `lr_at`,
//! `torch.optim.AdamW`, `evaluate`).

#[path = "../examples/common/idx.rs"]
mod idx;
#[path = "../examples/common/lm_training.rs"]
mod lm_training;
#[path = "../examples/common/shakespeare.rs"]
mod shakespeare;
#[path = "../examples/common/trainer.rs"]
mod trainer;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;

use lm_training::{adamw, mean_loss, window_losses, LrSchedule};
use shakespeare::{
    split_point, BatchSampler, Corpus, Vocab, WindowSet, BATCH_SIZE, CONTEXT, EVAL_SEED,
    EVAL_WINDOWS, FINETUNE_BATCH_STREAM, FLOAT_BATCH_STREAM, VOCAB_SIZE,
};

const CPU: Device = Device::Cpu;

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-30)
}

#[test]
fn embedded_corpus_vocab_and_split_are_the_references() {
    let c = Corpus::embedded().unwrap();
    // Python: repr(''.join(sorted(set(text)))).
    let expected: Vec<char> = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
        .chars()
        .collect();
    assert_eq!(c.vocab.chars(), &expected[..]);
    assert_eq!(c.vocab.len(), VOCAB_SIZE);
    // The reference's log: "train 1,003,854, val 111,540".
    assert_eq!(c.train.len(), 1_003_854);
    assert_eq!(c.val.len(), 111_540);
    assert_eq!(
        c.train.len() + c.val.len(),
        shakespeare::EMBEDDED.chars().count()
    );
    // The split is by position: the validation split starts where training ends.
    let all = c.vocab.encode(shakespeare::EMBEDDED).unwrap();
    assert_eq!(&all[..c.train.len()], &c.train[..]);
    assert_eq!(&all[c.train.len()..], &c.val[..]);
}

#[test]
fn split_point_is_pythons_int_of_0_9_n() {
    // int(0.9 * n) in Python for each n.
    for (n, k) in [
        (10, 9),
        (70, 63),
        (131, 117),
        (1000, 900),
        (1_115_394, 1_003_854),
    ] {
        assert_eq!(split_point(n), k, "n = {n}");
    }
}

#[test]
fn encode_decode_round_trip_and_errors() {
    let c = Corpus::embedded().unwrap();
    let ids = c.vocab.encode(shakespeare::EMBEDDED).unwrap();
    assert_eq!(c.vocab.decode(&ids).unwrap(), shakespeare::EMBEDDED);
    assert_eq!(
        c.vocab.encode("ROMEO:").unwrap(),
        vec![30, 27, 25, 17, 27, 10]
    );
    assert_eq!(c.vocab.decode(&[0, 1, 64]).unwrap(), "\n z");
    let e = c.vocab.encode("caf\u{e9}").unwrap_err().to_string();
    assert!(e.contains("'\u{e9}'") && e.contains("position 3"), "{e}");
    let e = c.vocab.decode(&[3, 65]).unwrap_err().to_string();
    assert!(e.contains("id 65") && e.contains("position 1"), "{e}");
    assert!(Vocab::from_text("").is_err());
}

#[test]
fn a_text_too_short_for_a_window_is_an_error() {
    let short = "ab".repeat(CONTEXT); // 128 chars: 115 train, 13 validation
    let e = Corpus::from_text(&short, "short.txt")
        .unwrap_err()
        .to_string();
    assert!(e.contains("validation split has 13"), "{e}");
    let ok = "abc".repeat(CONTEXT * 4); // 768 chars: 691 / 77
    let c = Corpus::from_text(&ok, "ok.txt").unwrap();
    assert_eq!((c.train.len(), c.val.len()), (691, 77));
}

#[test]
fn full_validation_split_is_1742_non_overlapping_windows() {
    let c = Corpus::embedded().unwrap();
    let w = WindowSet::non_overlapping(&c.val).unwrap();
    assert_eq!(w.len(), 1742);
    assert_eq!(w.starts()[..3], [0, 64, 128]);
    assert_eq!(*w.starts().last().unwrap(), 1741 * 64);
    let (x, y) = w.all(&CPU).unwrap();
    assert_eq!(x.dims(), &[1742, CONTEXT]);
    assert_eq!(y.dims(), &[1742, CONTEXT]);
    // Window i: inputs val[64 i .. 64 i + 64], targets shifted by one.
    let (x, y) = (x.to_vec2::<u32>().unwrap(), y.to_vec2::<u32>().unwrap());
    for i in [0, 1, 871, 1741] {
        assert_eq!(&x[i][..], &c.val[64 * i..64 * i + 64]);
        assert_eq!(&y[i][..], &c.val[64 * i + 1..64 * i + 65]);
    }
    // A split of exactly k * 64 + 1 tokens has k windows; one token less, k - 1.
    let t: Vec<u32> = (0..(3 * CONTEXT + 1) as u32).collect();
    assert_eq!(WindowSet::non_overlapping(&t).unwrap().len(), 3);
    assert_eq!(
        WindowSet::non_overlapping(&t[..3 * CONTEXT]).unwrap().len(),
        2
    );
}

#[test]
fn eval_windows_are_fixed_by_the_eval_seed_alone() {
    let c = Corpus::embedded().unwrap();
    let a = WindowSet::eval(&c.val, EVAL_WINDOWS, EVAL_SEED).unwrap();
    let b = WindowSet::eval(&c.val, EVAL_WINDOWS, EVAL_SEED).unwrap();
    assert_eq!(a.len(), 200);
    assert_eq!(a.starts(), b.starts());
    let t = WindowSet::eval(&c.train, EVAL_WINDOWS, EVAL_SEED + 1).unwrap();
    assert_ne!(a.starts(), t.starts());
    assert!(a.starts().iter().all(|&s| s + CONTEXT < c.val.len()));
    // Spread over the split, not bunched (200 uniform draws over 111,476 starts).
    let (lo, hi) = (
        a.starts().iter().min().unwrap(),
        a.starts().iter().max().unwrap(),
    );
    assert!(*lo < 5_000 && *hi > 105_000, "{lo} {hi}");
}

#[test]
fn batches_are_random_windows_from_the_seeded_stream() {
    let c = Corpus::embedded().unwrap();
    let mut s1 = BatchSampler::new(0, FLOAT_BATCH_STREAM, BATCH_SIZE).unwrap();
    let mut s2 = BatchSampler::new(0, FLOAT_BATCH_STREAM, BATCH_SIZE).unwrap();
    let mut s3 = BatchSampler::new(0, FINETUNE_BATCH_STREAM, BATCH_SIZE).unwrap();
    let mut s4 = BatchSampler::new(1, FLOAT_BATCH_STREAM, BATCH_SIZE).unwrap();
    let (x1, y1) = s1.next_batch(&c.train, &CPU).unwrap();
    let (x2, _) = s2.next_batch(&c.train, &CPU).unwrap();
    let (x3, _) = s3.next_batch(&c.train, &CPU).unwrap();
    let (x4, _) = s4.next_batch(&c.train, &CPU).unwrap();
    assert_eq!(x1.dims(), &[32, 64]);
    assert_eq!(y1.dims(), &[32, 64]);
    let v = |t: &Tensor| t.to_vec2::<u32>().unwrap();
    assert_eq!(v(&x1), v(&x2));
    assert_ne!(v(&x1), v(&x3));
    assert_ne!(v(&x1), v(&x4));
    // The next batch differs from the first.
    let (x1b, _) = s1.next_batch(&c.train, &CPU).unwrap();
    assert_ne!(v(&x1), v(&x1b));
    // Targets are the inputs shifted by one.
    let (xs, ys) = (v(&x1), v(&y1));
    for (x, y) in xs.iter().zip(&ys) {
        assert_eq!(&x[1..], &y[..CONTEXT - 1]);
    }
    // Starts cover 0..len - CONTEXT: on a split of CONTEXT + 2 tokens both starts occur.
    let t: Vec<u32> = (0..(CONTEXT + 2) as u32).collect();
    let mut s = BatchSampler::new(3, FLOAT_BATCH_STREAM, 64).unwrap();
    let (x, _) = s.next_batch(&t, &CPU).unwrap();
    let firsts: std::collections::BTreeSet<u32> = v(&x).iter().map(|row| row[0]).collect();
    assert_eq!(firsts.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    assert!(BatchSampler::new(0, 1, 0).is_err());
    assert!(WindowSet::random(&t[..CONTEXT], 1, &mut trainer::Rng::new(0)).is_err());
    assert!(WindowSet::at(&t, vec![2]).is_err());
}

#[test]
fn schedules_are_the_references_lr_at() {
    // Python: lr_at(s, 1500, 3e-3, 3e-4, 100) and lr_at(s, 300, 3e-4, 3e-5, 0).
    let f = LrSchedule::float(1500);
    for (s, lr) in [
        (0, 3e-05),
        (49, 0.0015),
        (99, 0.003),
        (100, 0.003),
        (249, 0.0029252398318965348),
        (499, 0.0024940775860532024),
        (749, 0.0018041620043783466),
        (999, 0.0010669878133641637),
        (1249, 0.0005085369418825339),
        (1499, 0.0003000033989694771),
    ] {
        assert!(
            close(f.at(s), lr, 1e-12),
            "float step {s}: {} vs {lr}",
            f.at(s)
        );
    }
    let q = LrSchedule::finetune(300);
    for (s, lr) in [
        (0, 0.0003),
        (99, 0.0002337205911263001),
        (199, 9.872799326195598e-05),
        (299, 3.0007402135655863e-05),
    ] {
        assert!(
            close(q.at(s), lr, 1e-12),
            "finetune step {s}: {} vs {lr}",
            q.at(s)
        );
    }
    assert_eq!(q.at(300), 3e-5);
    assert_eq!(f.at(10_000), 3e-4);
    // Warm-up is linear and reaches max at its last step.
    assert!((1..100).all(|s| f.at(s) > f.at(s - 1)));
    assert!((100..1500).all(|s| f.at(s) <= f.at(s - 1)));
}

#[test]
fn adamw_matches_torch() {
    // torch 2.15: p = Parameter([0.5, -1.25, 2.0, 0.0, -0.003, 3.5]);
    // AdamW([p], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1); three steps with these
    // gradients at lr 3e-3, 2e-3, 1e-3; p after each step.
    let grads = [
        [0.1f32, -0.2, 0.3, 1.0, -0.5, 0.0],
        [-0.05, 0.4, 0.3, -2.0, 0.25, 1e-3],
        [0.7, 0.0, -0.1, 0.5, 0.5, -3.0],
    ];
    let expected: [[f64; 6]; 3] = [
        [
            0.49685001373291016,
            -1.2466249465942383,
            1.996399998664856,
            -0.0029999995604157448,
            8.994247764348984e-07,
            3.4989500045776367,
        ],
        [
            0.4962179660797119,
            -1.2471078634262085,
            1.994000792503357,
            -0.0022671925835311413,
            0.0005335733294487,
            3.4967620372772217,
        ],
        [
            0.49550506472587585,
            -1.247266173362732,
            1.993195652961731,
            -0.0021302751265466213,
            0.0002608231734484434,
            3.4970510005950928,
        ],
    ];
    let p = Var::new(&[0.5f32, -1.25, 2.0, 0.0, -0.003, 3.5], &CPU).unwrap();
    let mut opt = adamw(vec![p.clone()], 3e-3).unwrap();
    for ((g, lr), want) in grads.iter().zip([3e-3, 2e-3, 1e-3]).zip(expected) {
        opt.set_learning_rate(lr);
        // loss = sum(p * g) has gradient g.
        let gt = Tensor::new(g, &CPU).unwrap();
        let loss = (p.as_tensor() * &gt).unwrap().sum_all().unwrap();
        opt.backward_step(&loss).unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            // A few f32 roundings apart at most (the order of operations differs): ulps of
            // the operands (|p| up to 3.5, the update about lr), not of a cancelled result.
            assert!(
                (a as f64 - b).abs() <= 1e-9 + 2e-7 * b.abs(),
                "element {i}: {a} vs torch {b}"
            );
        }
    }
}

/// Logits of a fixed random "model": a table of logits per input token, so each position's
/// distribution depends on its input.
fn table_model(table: &Tensor) -> impl FnMut(&Tensor) -> candle_core::Result<Tensor> + '_ {
    move |x: &Tensor| {
        let (b, t) = x.dims2()?;
        table
            .index_select(&x.flatten_all()?, 0)?
            .reshape((b, t, ()))
    }
}

#[test]
fn eval_is_the_mean_cross_entropy_over_every_position() {
    let c = Corpus::embedded().unwrap();
    let set = WindowSet::eval(&c.val, 37, EVAL_SEED).unwrap();
    // Uniform logits: ln(65) at every position.
    let uniform = |x: &Tensor| {
        let (b, t) = x.dims2()?;
        Tensor::zeros((b, t, VOCAB_SIZE), DType::F32, &CPU)
    };
    let l = mean_loss(&set, 10, &CPU, uniform).unwrap();
    assert!(close(l, (65f64).ln(), 1e-6), "{l}");
    // A token-dependent model against a scalar f64 computation.
    let mut rng = trainer::Rng::new(5);
    let vals: Vec<f32> = (0..VOCAB_SIZE * VOCAB_SIZE)
        .map(|_| (3.0 * rng.normal()) as f32)
        .collect();
    let table = Tensor::from_vec(vals.clone(), (VOCAB_SIZE, VOCAB_SIZE), &CPU).unwrap();
    let (x, y) = set.all(&CPU).unwrap();
    let (x, y) = (x.to_vec2::<u32>().unwrap(), y.to_vec2::<u32>().unwrap());
    let mut want = Vec::new();
    for (xr, yr) in x.iter().zip(&y) {
        let mut s = 0.0f64;
        for (&xi, &yi) in xr.iter().zip(yr) {
            let row = &vals[xi as usize * VOCAB_SIZE..(xi as usize + 1) * VOCAB_SIZE];
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            s += lse - row[yi as usize] as f64;
        }
        want.push(s / CONTEXT as f64);
    }
    for batch in [1, 10, 37, 100] {
        let got = window_losses(&set, batch, &CPU, table_model(&table)).unwrap();
        assert_eq!(got.len(), 37);
        for (g, w) in got.iter().zip(&want) {
            assert!(close(*g, *w, 1e-5), "batch {batch}: {g} vs {w}");
        }
    }
    let mean = mean_loss(&set, 100, &CPU, table_model(&table)).unwrap();
    assert!(close(mean, want.iter().sum::<f64>() / 37.0, 1e-5));
    // The loss is taken in f32 whatever the logits' dtype.
    let half = |x: &Tensor| table_model(&table)(x)?.to_dtype(DType::BF16);
    let lh = mean_loss(&set, 100, &CPU, half).unwrap();
    assert!((lh - mean).abs() < 0.05, "{lh} vs {mean}");
}

#[test]
fn eval_rejects_logits_that_do_not_fit() {
    let c = Corpus::embedded().unwrap();
    let set = WindowSet::eval(&c.val, 4, EVAL_SEED).unwrap();
    let wrong_len = |x: &Tensor| {
        let (b, _) = x.dims2()?;
        Tensor::zeros((b, CONTEXT - 1, VOCAB_SIZE), DType::F32, &CPU)
    };
    let e = mean_loss(&set, 4, &CPU, wrong_len).unwrap_err().to_string();
    assert!(e.contains("lm_training::window_losses"), "{e}");
    let small_vocab = |x: &Tensor| {
        let (b, t) = x.dims2()?;
        Tensor::zeros((b, t, 10), DType::F32, &CPU)
    };
    let e = mean_loss(&set, 4, &CPU, small_vocab)
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocabulary of 10"), "{e}");
    let flat = |x: &Tensor| x.to_dtype(DType::F32);
    assert!(mean_loss(&set, 4, &CPU, flat).is_err());
    assert!(window_losses(&set, 0, &CPU, flat).is_err());
    let empty = WindowSet::at(&c.val, vec![]).unwrap();
    assert!(mean_loss(&empty, 4, &CPU, flat).is_err());
    // The model's own error comes through.
    let failing =
        |_: &Tensor| -> candle_core::Result<Tensor> { Err(candle_core::Error::Msg("boom".into())) };
    let e = mean_loss(&set, 4, &CPU, failing).unwrap_err().to_string();
    assert!(e.contains("boom"), "{e}");
}
