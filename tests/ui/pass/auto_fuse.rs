//! auto_fuse: every supported pattern, alone and beside declared groups and skipped fields.
#![deny(warnings)]

use candle_qat::model::Quantizable;
use candle_qat::nn::{
    BatchNorm1d, BatchNorm2d, BatchNorm3d, Conv1d, Conv2d, Conv3d, Linear, MaxPool2d, ReLU,
};
use candle_qat::Quantizable;

#[derive(Quantizable)]
#[qat(auto_fuse)]
#[allow(dead_code)]
struct All {
    c1: Conv1d,
    b1: BatchNorm1d,
    r1: ReLU,
    c2: candle_qat::nn::Conv2d,
    b2: BatchNorm2d,
    c3: Conv3d,
    r3: ReLU,
    l1: Linear,
    lb: BatchNorm1d,
    l2: Linear,
    lr: ReLU,
    bn3: BatchNorm3d,
    br3: ReLU,
    pool: MaxPool2d,
    // a skipped field breaks a run
    c4: Conv2d,
    #[qat(skip)]
    rate: f32,
    r4: ReLU,
}

#[derive(Quantizable)]
#[qat(auto_fuse, fuse(conv_b, relu_b))]
struct Mixed {
    conv_a: Conv2d,
    bn_a: BatchNorm2d,
    conv_b: Conv2d,
    relu_b: ReLU,
    relu_c: ReLU,
}

fn main() {
    fn groups<T: Quantizable>() {}
    groups::<All>();
    groups::<Mixed>();
}
