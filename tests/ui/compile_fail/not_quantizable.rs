use candle_qat::nn::Conv2d;
use candle_qat::Quantizable;

#[derive(Quantizable)]
struct Net {
    conv1: Conv2d,
    dropout: f64,
    heads: Vec<candle_nn::Linear>,
}

fn main() {}
