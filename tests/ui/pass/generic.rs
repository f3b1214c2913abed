//! Generic structs: bounds only for walked fields (and groups) that mention a type parameter.
#![deny(warnings)]

use candle_qat::model::Quantizable;
use candle_qat::nn::{BatchNorm2d, Conv2d, Linear, ReLU};
use candle_qat::qconfig_mapping::Named;
use candle_qat::Quantizable;

#[derive(Quantizable)]
#[qat(fuse(conv, bn, relu))]
struct Block {
    conv: Conv2d,
    bn: BatchNorm2d,
    relu: ReLU,
}

/// `Vec<B>: Quantizable` is required; `M` (skipped) is not bounded.
#[derive(Quantizable)]
#[qat(fuse(fc, relu))]
#[allow(dead_code)]
struct Net<B, M> {
    blocks: Vec<B>,
    fc: Linear,
    relu: ReLU,
    #[qat(skip)]
    meta: M,
}

/// Const generics, lifetimes and an existing where clause.
#[derive(Quantizable)]
#[allow(dead_code)]
struct Stage<'a, B, const N: usize>
where
    B: Send,
{
    blocks: [B; N],
    #[qat(skip)]
    name: &'a str,
}

/// A group whose head is a type parameter gets a `Fusable` bound.
#[derive(Quantizable)]
#[qat(fuse(head, relu))]
struct Activated<H> {
    head: H,
    relu: ReLU,
}

#[allow(dead_code)]
struct NotALayer;

fn assert_quantizable<T: Quantizable + Named>() {}

fn main() {
    assert_quantizable::<Net<Block, NotALayer>>();
    assert_quantizable::<Stage<'static, Block, 3>>();
    assert_quantizable::<Activated<Conv2d>>();
    assert_quantizable::<Activated<Linear>>();
    assert_eq!(<Net<Block, ()> as Named>::TYPE_NAME, "Net");
}
