//! Tuple structs: fields are named by index, in paths and in groups.
#![deny(warnings)]

use candle_qat::model::Quantizable;
use candle_qat::nn::{BatchNorm2d, Conv2d, ReLU};
use candle_qat::qconfig_mapping::Named;
use candle_qat::Quantizable;

#[derive(Quantizable)]
#[qat(fuse(0, 1, 2))]
struct ConvBnRelu(Conv2d, BatchNorm2d, ReLU);

#[derive(Quantizable)]
struct Pair(ConvBnRelu, #[qat(skip)] f32, ReLU);

#[derive(Quantizable)]
struct Unit;

#[derive(Quantizable)]
struct Empty {}

fn assert_quantizable<T: Quantizable + Named>() {}

fn main() {
    assert_quantizable::<ConvBnRelu>();
    assert_quantizable::<Pair>();
    assert_quantizable::<Unit>();
    assert_quantizable::<Empty>();
    assert_eq!(Unit.fusion_groups(), Vec::<Vec<&str>>::new());
    assert_eq!(<Empty as Named>::TYPE_NAME, "Empty");
}
