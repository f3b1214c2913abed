//! Named fields, several groups (in one and in several #[qat]), skipped fields of any type.
#![deny(warnings)]

use candle_qat::model::Quantizable;
use candle_qat::nn::{BatchNorm1d, BatchNorm2d, Conv2d, Linear, ReLU};
use candle_qat::qconfig_mapping::Named;
use candle_qat::Quantizable;

#[allow(dead_code)]
struct NotALayer(f32);

#[derive(Quantizable)]
#[qat(fuse(conv1, bn1, relu1), fuse(conv2, relu2))]
#[qat(fuse(fc, bn_fc))]
#[allow(dead_code)]
struct Net {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    relu1: ReLU,
    #[qat(skip)]
    dropout: f64,
    conv2: Conv2d,
    relu2: ReLU,
    #[qat(skip)]
    plain: candle_nn::Linear,
    #[qat()]
    fc: Linear,
    bn_fc: BatchNorm1d,
    #[qat(skip)]
    other: NotALayer,
}

fn assert_quantizable<T: Quantizable + Named>() {}

fn main() {
    assert_quantizable::<Net>();
    assert_eq!(<Net as Named>::TYPE_NAME, "Net");
}
