//! GGML block fake quantization against candle itself: values bit for bit equal to
//! `QTensor::quantize` then `dequantize`, blocks byte for byte equal to `QTensor::data`,
//! on random and adversarial blocks; the straight-through mask; the fake-quant matmul
//! against `QMatMul::forward`.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_qat::ggml::{
    fake_quantize_ggml, fake_quantize_ggml_backward, fake_quantize_vec_dot, quantize_blocks,
    to_qtensor, BlockType, VecDotType,
};

type Res = Result<(), Box<dyn std::error::Error>>;

const B32: [BlockType; 5] = [
    BlockType::Q8_0,
    BlockType::Q4_0,
    BlockType::Q4_1,
    BlockType::Q5_0,
    BlockType::Q5_1,
];

/// A deterministic generator (64-bit LCG), uniform in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn cpu(v: Vec<f32>, cols: usize) -> Tensor {
    let rows = v.len() / cols;
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor")
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 data")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Ours against candle on `x`: values (bits), blocks (bytes), `to_qtensor`'s bytes.
fn check_against_candle(x: &Tensor, ty: BlockType, what: &str) -> Res {
    let q = QTensor::quantize(x, ty.dtype())?;
    let want_y = q.dequantize(&Device::Cpu)?;
    let got_y = fake_quantize_ggml(x, ty)?;
    let (g, w) = (bits(&got_y), bits(&want_y));
    if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i]) {
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let b = i / ty.block_size() * ty.block_size();
        return Err(format!(
            "{what} {ty:?}: y[{i}] = {:e} ({:#x}), candle {:e} ({:#x}); x = {:e}, block {:?}",
            f32::from_bits(g[i]),
            g[i],
            f32::from_bits(w[i]),
            w[i],
            xs[i],
            &xs[b..b + ty.block_size().min(32)]
        )
        .into());
    }
    let want_b = q.data()?;
    let got_b = quantize_blocks(x, ty)?;
    if let Some(i) = (0..got_b.len()).find(|&i| got_b[i] != want_b[i]) {
        let blk = i / ty.bytes_per_block() * ty.bytes_per_block();
        return Err(format!(
            "{what} {ty:?}: block byte {i}: {:?}, candle {:?}",
            &got_b[blk..blk + ty.bytes_per_block()],
            &want_b[blk..blk + ty.bytes_per_block()]
        )
        .into());
    }
    assert_eq!(got_b.len(), want_b.len());
    assert_eq!(to_qtensor(x, ty)?.data()?.as_ref(), want_b.as_ref());
    Ok(())
}

#[test]
fn random_data_matches_candle() -> Res {
    let mut rng = Lcg(7);
    for ty in BlockType::ALL {
        for (scale, cols) in [(1.0, 512), (1e-3, 256), (40.0, 768), (3e4, 256)] {
            let x = cpu(rng.vec(cols * 6, scale), cols);
            check_against_candle(&x, ty, &format!("scale {scale}"))?;
            // Shifted data: the minimum of Q4_1/Q5_1 away from zero.
            check_against_candle(&x.affine(1.0, scale as f64)?, ty, "shifted")?;
        }
    }
    Ok(())
}

/// 32-element blocks that test every rule: zeros, signed zeros, one outlier, the clamped
/// opposite extreme, ties, tiny and huge values, a scale overflowing f16, NaN-free only.
fn adversarial_blocks() -> Vec<(&'static str, Vec<f32>)> {
    let mut rng = Lcg(11);
    let mut v: Vec<(&'static str, Vec<f32>)> = Vec::new();
    v.push(("zeros", vec![0.0; 32]));
    v.push(("negative zeros", vec![-0.0; 32]));
    let mut z = vec![0.0f32; 32];
    z[3] = -0.0;
    v.push(("+0 then -0", z.clone()));
    z[30] = -0.0;
    z[31] = 0.0;
    v.push(("mixed zeros, +0 last", z.clone()));
    let mut z: Vec<f32> = (0..32).map(|i| i as f32 * 0.1).collect();
    z[5] = -0.0;
    v.push(("nonnegative with -0", z.clone()));
    z.reverse();
    v.push(("nonnegative with -0 reversed", z));
    let mut o = vec![0.01f32; 32];
    o[17] = 100.0;
    v.push(("one outlier", o.clone()));
    o[17] = -100.0;
    v.push(("one negative outlier", o));
    // Q4_0/Q5_0: max = -1 first, so +1 maps to code 16 / 32 and clamps.
    let mut e: Vec<f32> = (0..32).map(|i| (i as f32 / 31.0) * 2.0 - 1.0).collect();
    v.push(("opposite extreme", e.clone()));
    e.reverse();
    v.push(("opposite extreme reversed", e.clone()));
    let mut e2 = vec![0.3f32; 32];
    e2[0] = -1.0;
    e2[1] = 1.0;
    e2[2] = 0.999_999_9;
    v.push(("+-1 tie of |x|", e2));
    // Ties: multiples of half a step for each type's scale.
    v.push((
        "half steps of 1/8",
        (0..32).map(|i| (i as f32 - 16.0) / 16.0).collect(),
    ));
    v.push((
        "half steps of 127",
        (0..32).map(|i| (i as f32 - 16.0) * 0.5 + 0.25).collect(),
    ));
    v.push(("tiny", rng.vec(32, 1e-30)));
    v.push(("subnormal", rng.vec(32, 1e-39)));
    v.push(("smallest f16 scale", rng.vec(32, 6e-8)));
    v.push(("huge", rng.vec(32, 3e38)));
    v.push(("f16 overflow of the scale", rng.vec(32, 1e7)));
    v.push(("f16 overflow edge", rng.vec(32, 65504.0 * 8.0)));
    let mut c = vec![5.0f32; 32];
    c[9] = 5.0;
    v.push(("constant", c));
    v.push(("constant negative", vec![-2.5f32; 32]));
    v.push(("ramp", (0..32).map(|i| i as f32).collect()));
    v
}

#[test]
fn adversarial_blocks_match_candle() -> Res {
    for ty in BlockType::ALL {
        for (what, block) in adversarial_blocks() {
            // Tile each block to the type's block size (and two blocks' worth of rows).
            let n = ty.block_size();
            let row: Vec<f32> = block.iter().cycle().take(n).copied().collect();
            let mut data = row.clone();
            data.extend(row.iter().rev());
            check_against_candle(&cpu(data, n), ty, what)?;
        }
    }
    Ok(())
}

#[test]
fn nan_blocks_match_candle() -> Res {
    for ty in BlockType::ALL {
        let n = ty.block_size();
        let mut rng = Lcg(3);
        let mut data = rng.vec(2 * n, 1.0);
        data[5] = f32::NAN;
        data[n + 7] = f32::INFINITY;
        let x = cpu(data, n);
        let want = QTensor::quantize(&x, ty.dtype())?.dequantize(&Device::Cpu)?;
        let got = fake_quantize_ggml(&x, ty)?;
        let (g, w) = (
            got.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?,
        );
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{ty:?}[{i}]: {a} vs candle {b}"
            );
        }
        assert_eq!(
            quantize_blocks(&x, ty)?,
            QTensor::quantize(&x, ty.dtype())?.data()?.as_ref(),
            "{ty:?}"
        );
    }
    Ok(())
}

/// The gradient through autograd, and the backward kernel on its own.
fn grads(
    x: &Tensor,
    dy: &Tensor,
    ty: BlockType,
) -> Result<(Vec<f32>, Vec<f32>), candle_qat::Error> {
    let v = Var::from_tensor(x)?;
    let y = fake_quantize_ggml(v.as_tensor(), ty)?;
    let g = (y * dy)?.sum_all()?.backward()?;
    let auto = g
        .get(v.as_tensor())
        .expect("gradient")
        .flatten_all()?
        .to_vec1::<f32>()?;
    let kernel = fake_quantize_ggml_backward(x, dy, ty)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((auto, kernel))
}

#[test]
fn ste_mask_zeroes_exactly_the_clamped_codes() -> Res {
    // max = -1 comes first: d = 1/8 (Q4_0) or 1/16 (Q5_0); x maps to code 8 * (1 + x)
    // (resp. 16 * (1 + x)) rounded down after + 0.5, so x >= 15.5 / 16 clamps (31.5 / 32).
    let block: Vec<f32> = (0..32).map(|i| (i as f32 / 31.0) * 2.0 - 1.0).collect();
    let x = cpu(block.clone(), 32);
    let dy = cpu((0..32).map(|i| 1.0 + i as f32).collect(), 32);
    for (ty, limit) in [
        (BlockType::Q4_0, 15.5f32 / 8.0),
        (BlockType::Q5_0, 31.5 / 16.0),
    ] {
        let (auto, kernel) = grads(&x, &dy, ty)?;
        assert_eq!(auto, kernel, "{ty:?}");
        for (i, &g) in auto.iter().enumerate() {
            let clamped = 1.0 + block[i] >= limit;
            assert_eq!(g, if clamped { 0.0 } else { 1.0 + i as f32 }, "{ty:?}[{i}]");
        }
        assert!(
            auto.contains(&0.0),
            "{ty:?}: the block must clamp somewhere"
        );
    }
    // Q8_0 / Q4_1 / Q5_1 never clamp finite data whose scale is finite.
    let x = cpu(Lcg(5).vec(32 * 64, 3.0), 256);
    let dy = cpu(Lcg(6).vec(32 * 64, 1.0), 256);
    let want = dy.flatten_all()?.to_vec1::<f32>()?;
    for ty in [BlockType::Q8_0, BlockType::Q4_1, BlockType::Q5_1] {
        let (auto, kernel) = grads(&x, &dy, ty)?;
        assert_eq!(auto, want, "{ty:?}");
        assert_eq!(kernel, want, "{ty:?}");
    }
    Ok(())
}

#[test]
fn k_quant_mask_marks_only_sub_block_extremes() -> Res {
    let mut rng = Lcg(9);
    // Heavy-tailed data: cubes of uniform values, so scales round and some codes clamp.
    let data: Vec<f32> = rng.vec(256 * 32, 1.0).iter().map(|v| v * v * v).collect();
    let x = cpu(data.clone(), 512);
    let dy = Tensor::ones_like(&x)?;
    for (ty, sub) in [(BlockType::Q4K, 32), (BlockType::Q6K, 16)] {
        let (auto, kernel) = grads(&x, &dy, ty)?;
        assert_eq!(auto, kernel, "{ty:?}");
        let y = fake_quantize_ggml(&x, ty)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut clamped = 0;
        for (s, (ys, gs)) in y.chunks(sub).zip(auto.chunks(sub)).enumerate() {
            let lo = ys.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = ys.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for (i, (&yv, &g)) in ys.iter().zip(gs).enumerate() {
                if g == 0.0 {
                    clamped += 1;
                    assert!(
                        yv == lo || yv == hi,
                        "{ty:?} sub-block {s}[{i}]: {yv} not extreme"
                    );
                    // A clamped element lies beyond its quantized value, outward.
                    let xv = data[s * sub + i];
                    assert!(
                        (yv == hi && xv > yv) || (yv == lo && xv < yv),
                        "{ty:?}: {xv} {yv}"
                    );
                } else {
                    assert_eq!(g, 1.0);
                }
            }
        }
        assert!(clamped > 0, "{ty:?}: no clamped code in the test data");
        println!("{ty:?}: {clamped} of {} codes clamped", y.len());
    }
    Ok(())
}

#[test]
fn vec_dot_types_match_candle() -> Res {
    let mut rng = Lcg(13);
    let x = cpu(rng.vec(256 * 12, 2.0), 768);
    for ty in [VecDotType::Q8_0, VecDotType::Q8_1, VecDotType::Q8K] {
        let want = QTensor::quantize(&x, ty.dtype())?.dequantize(&Device::Cpu)?;
        assert_eq!(bits(&fake_quantize_vec_dot(&x, ty)?), bits(&want), "{ty:?}");
    }
    // Straight through: nothing clamps in finite data.
    let v = Var::from_tensor(&x)?;
    let g = fake_quantize_vec_dot(v.as_tensor(), VecDotType::Q8K)?
        .sum_all()?
        .backward()?;
    let g = g
        .get(v.as_tensor())
        .expect("gradient")
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert!(g.iter().all(|&v| v == 1.0));
    Ok(())
}

#[test]
fn shapes_dtypes_and_errors() -> Res {
    let x = cpu(Lcg(1).vec(96 * 4, 1.0), 96);
    let e = fake_quantize_ggml(&x, BlockType::Q4K)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 256") && e.contains("Q4_K"), "{e}");
    assert!(fake_quantize_vec_dot(&x, VecDotType::Q8K).is_err());
    assert!(fake_quantize_ggml(&cpu(vec![0.0; 40], 40), BlockType::Q4_0).is_err());
    let ints = Tensor::zeros((2, 32), DType::U32, &Device::Cpu)?;
    assert!(fake_quantize_ggml(&ints, BlockType::Q8_0).is_err());
    // f16 / bf16: computed in f32 from the input's values, returned in its dtype.
    for dt in [DType::F16, DType::BF16] {
        let xh = x.to_dtype(dt)?;
        let got = fake_quantize_ggml(&xh, BlockType::Q4_0)?;
        assert_eq!(got.dtype(), dt);
        let want = fake_quantize_ggml(&xh.to_dtype(DType::F32)?, BlockType::Q4_0)?.to_dtype(dt)?;
        assert_eq!(
            bits(&got.to_dtype(DType::F32)?),
            bits(&want.to_dtype(DType::F32)?)
        );
    }
    // Higher rank: blocks along the last dim; a non-contiguous input is made contiguous.
    let x3 = x.reshape((2, 2, 96))?;
    assert_eq!(
        bits(&fake_quantize_ggml(&x3, BlockType::Q5_1)?),
        bits(&fake_quantize_ggml(&x, BlockType::Q5_1)?)
    );
    let xt = cpu(Lcg(2).vec(64 * 32, 1.0), 32).t()?;
    check_against_candle(&xt.contiguous()?, BlockType::Q8_0, "transposed")?;
    assert_eq!(
        bits(&fake_quantize_ggml(&xt, BlockType::Q8_0)?),
        bits(&fake_quantize_ggml(&xt.contiguous()?, BlockType::Q8_0)?)
    );
    // Empty tensors pass through.
    let empty = Tensor::zeros((0, 32), DType::F32, &Device::Cpu)?;
    assert_eq!(
        fake_quantize_ggml(&empty, BlockType::Q4_0)?.dims(),
        &[0, 32]
    );
    Ok(())
}

/// Whether candle takes its repacked Q8_0 path (Q8_K inputs) on this CPU: AVX-512 VNNI or
/// AVX-VNNI, unless `MISTRALRS_FORCE_AVX2=1` (candle's `repack_x86::level`).
fn q8_0_repacked() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let forced = std::env::var("MISTRALRS_FORCE_AVX2").as_deref() == Ok("1");
        !forced
            && ((is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"))
                || (std::env::var("MISTRALRS_FORCE_AVXVNNI").as_deref() == Ok("1")
                    || is_x86_feature_detected!("avxvnni")))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[test]
fn fake_quant_matmul_matches_qmatmul() -> Res {
    let mut rng = Lcg(17);
    println!(
        "candle's repacked Q8_0 path (Q8_K inputs) on this CPU: {}",
        q8_0_repacked()
    );
    // (m, k, n): an even number of 32-blocks per row (candle's debug asserts for
    // Q4_1/Q5_0/Q5_1); k = 192 is not a multiple of 256, so no type is repacked.
    for (m, k, n) in [(5, 192, 24), (1, 64, 8), (7, 128, 33)] {
        let x = cpu(rng.vec(m * k, 1.5), k);
        let w = cpu(rng.vec(n * k, 0.2), k);
        for ty in B32 {
            let q = QMatMul::from_qtensor(to_qtensor(&w, ty)?)?;
            let want = q.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let xq = fake_quantize_vec_dot(&x, ty.vec_dot_type())?;
            let wq = fake_quantize_ggml(&w, ty)?;
            let got = xq.matmul(&wq.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let tol = match ty {
                BlockType::Q4_1 | BlockType::Q5_1 => 3e-4,
                _ => 1e-6,
            };
            println!(
                "{ty:?} ({m}, {k}, {n}): max |diff| / max |y| = {:.2e}",
                err / max
            );
            assert!(
                err <= tol * max,
                "{ty:?} ({m},{k},{n}): {err} > {tol} x {max}"
            );
        }
    }
    Ok(())
}

/// Max |ours - candle| / max |candle| of the fake-quant matmul against `QMatMul::forward`,
/// with the input fake-quantized in `input`.
fn matmul_rel_err(
    x: &Tensor,
    w: &Tensor,
    ty: BlockType,
    input: VecDotType,
) -> Result<f32, candle_qat::Error> {
    let q = QMatMul::from_qtensor(to_qtensor(w, ty)?)?;
    let want = q.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
    let got = fake_quantize_vec_dot(x, input)?
        .matmul(&fake_quantize_ggml(w, ty)?.t()?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    Ok(err / max)
}

/// Q8_0 weights with in_features % 256 == 0 and out_features % 16 == 0: on a CPU with
/// AVX-512 VNNI / AVX-VNNI candle repacks them and quantizes the input to Q8_K; with
/// `MISTRALRS_FORCE_AVX2=1` (checked in a child process, candle reads it once) it takes the
/// AVX2 path with Q8_0 inputs. The K-quants take Q8_K inputs on either path.
#[test]
fn repacked_paths_use_their_input_types() -> Res {
    let mut rng = Lcg(23);
    let (m, k, n) = (3, 512, 32);
    let x = cpu(rng.vec(m * k, 1.0), k);
    let w = cpu(rng.vec(n * k, 0.1), k);
    let repacked = q8_0_repacked();
    let input = if repacked {
        VecDotType::Q8K
    } else {
        VecDotType::Q8_0
    };
    let e = matmul_rel_err(&x, &w, BlockType::Q8_0, input)?;
    println!("Q8_0 repacked: {repacked}, inputs {input:?}: rel err {e:.2e}");
    assert!(e <= 1e-6, "{e}");
    for ty in [BlockType::Q4K, BlockType::Q6K] {
        let e = matmul_rel_err(&x, &w, ty, VecDotType::Q8K)?;
        println!("{ty:?}: rel err {e:.2e}");
        assert!(e <= 1e-6, "{ty:?}: {e}");
    }
    if repacked && std::env::var_os("MISTRALRS_FORCE_AVX2").is_none() {
        let out = std::process::Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "repacked_paths_use_their_input_types",
                "--nocapture",
            ])
            .env("MISTRALRS_FORCE_AVX2", "1")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!("child with MISTRALRS_FORCE_AVX2=1:\n{text}");
        assert!(
            out.status.success() && text.contains("Q8_0 repacked: false"),
            "{text}"
        );
    }
    Ok(())
}
