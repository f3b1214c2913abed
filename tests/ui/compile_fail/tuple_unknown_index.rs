use candle_qat::nn::{BatchNorm2d, Conv2d, ReLU};
use candle_qat::Quantizable;

#[derive(Quantizable)]
#[qat(fuse(0, 1, 3))]
struct ConvBnRelu(Conv2d, BatchNorm2d, ReLU);

fn main() {}
