//! Shared setup of the tests that train a net on the embedded MNIST subset and leave ONNX
//! exports for `tests/onnx/check_onnx.py` (tests/onnx_export.rs, tests/mobilenet_v2.rs): the
//! output directory and one training epoch. The including test declares `mod idx` and
//! `mod trainer` (examples/common/) at its root.

use std::path::PathBuf;

use candle_core::{Device, Module};
use candle_nn::VarMap;

use crate::idx::Mnist;
use crate::trainer::{self, AnyResult, EpochPlan, MomentumSgd, Rng};

/// `QAT_ONNX_DIR`, else `onnx-check` under the target's tmp dir.
pub fn out_dir() -> PathBuf {
    std::env::var_os("QAT_ONNX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("onnx-check"))
}

/// One epoch of momentum SGD (0.9, batches of 64, a cosine schedule from `lr`) over the
/// training images, in the order of permutation `seed`.
pub fn epoch<M: Module>(net: &M, vm: &VarMap, data: &Mnist, lr: f64, seed: u64) -> AnyResult<()> {
    let mut opt = MomentumSgd::new(vm.all_vars(), lr, 0.9);
    let plan = EpochPlan {
        split: &data.train,
        batch_size: 64,
        base_lr: lr,
        first_step: 0,
        total_steps: trainer::steps_per_epoch(data.train.n, 64),
        label: "train".into(),
    };
    let perm = Rng::new(seed).permutation(data.train.n);
    trainer::train_epoch(net, &mut opt, &plan, &perm, &Device::Cpu)?;
    Ok(())
}
