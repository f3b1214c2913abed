//! Option, arrays, Box, Vec and nested structs as fields.
#![deny(warnings)]

use candle_qat::model::Quantizable;
use candle_qat::nn::{Conv2d, DeQuantStub, FloatFunctional, Identity, Linear, QuantStub, ReLU};
use candle_qat::qconfig_mapping::Named;
use candle_qat::Quantizable;

#[derive(Quantizable)]
#[qat(fuse(conv, relu))]
struct Inner {
    conv: Conv2d,
    relu: ReLU,
}

#[derive(Quantizable)]
struct Middle {
    inner: Inner,
    skip: FloatFunctional,
}

#[derive(Quantizable)]
struct Outer {
    quant: QuantStub,
    stem: Box<Middle>,
    downsample: Option<Inner>,
    heads: [Linear; 2],
    stages: Vec<Vec<Middle>>,
    maybe: Option<Box<Identity>>,
    dequant: DeQuantStub,
}

fn assert_quantizable<T: Quantizable + Named>() {}

fn main() {
    assert_quantizable::<Middle>();
    assert_quantizable::<Outer>();
}
