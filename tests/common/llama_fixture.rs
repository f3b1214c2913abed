//! Deterministic weights and token ids for the tiny Llama's tests (tests/tiny_llama.rs,
//! tests/gguf_llama.rs): a seeded generator, a model drawn from it, and random ids. The
//! including test declares `mod tiny_llama` (examples/common/tiny_llama.rs) at its root.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::tiny_llama::{TinyLlama, TinyLlamaConfig};

pub type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// SplitMix64 with Box-Muller normals. (Its sequence fixes the weights of the GGUF file that
/// tools/gguf-check/check_gguf.py reads: keep it.)
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
}

/// A model of `cfg` with the reference's initialisation drawn from `rng`, every weight
/// multiplied by `gain`.
pub fn drawn_model(cfg: TinyLlamaConfig, rng: &mut Rng, gain: f64) -> Res<(TinyLlama, VarMap)> {
    let vm = VarMap::new();
    let m = TinyLlama::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    m.init_weights(&vm, || gain * rng.normal())?;
    Ok((m, vm))
}

/// `batch` rows of `cfg.ctx` token ids, uniform over the vocabulary, from seed `seed`.
pub fn ids(cfg: &TinyLlamaConfig, batch: usize, seed: u64) -> Res<Tensor> {
    let mut rng = Rng(seed);
    let v: Vec<u32> = (0..batch * cfg.ctx)
        .map(|_| (rng.next_u64() % cfg.vocab as u64) as u32)
        .collect();
    Ok(Tensor::from_vec(v, (batch, cfg.ctx), &Device::Cpu)?)
}
