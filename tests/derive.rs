//! Runtime behaviour of `#[derive(Quantizable)]` through the facade: module paths, fusion of
//! the declared (and auto-found) groups, the walk's enter/leave order, type names for the
//! qconfig mapping, and the fusion-order check.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_qat::model::{ModulePath, ModuleVisitorMut, QuantModule, Quantizable, Stage};
use candle_qat::nn::{
    BatchNorm1d, BatchNorm2d, BatchNormConfig, Conv2d, ConvConfig, DeQuantStub, Flatten, Linear,
    MaxPool2d, QuantStub, ReLU,
};
use candle_qat::passes::{fuse_modules, fuse_modules_qat, named_modules, prepare_qat};
use candle_qat::qconfig::{Backend, QConfig};
use candle_qat::qconfig_mapping::{Named, QConfigMapping};
use candle_qat::Quantizable;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn vb() -> VarBuilder<'static> {
    VarBuilder::zeros(DType::F32, &Device::Cpu)
}

fn conv(cin: usize, cout: usize) -> Res<Conv2d> {
    let cfg = ConvConfig {
        padding: 1,
        ..ConvConfig::default()
    };
    Ok(Conv2d::new(cin, cout, 3, cfg, false, vb())?)
}

fn bn2(n: usize) -> Res<BatchNorm2d> {
    Ok(BatchNorm2d::new(n, BatchNormConfig::default(), vb())?)
}

#[derive(Quantizable)]
#[qat(fuse(conv1, bn1, relu1))]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    relu1: ReLU,
}

impl Block {
    fn new(c: usize) -> Res<Self> {
        Ok(Block {
            conv1: conv(c, c)?,
            bn1: bn2(c)?,
            relu1: ReLU::new(),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.relu1
            .forward(&self.bn1.forward(&self.conv1.forward(x)?)?)
    }
}

#[derive(Quantizable)]
#[qat(fuse(fc, bn_fc), fuse(fc2, relu))]
struct Net {
    quant: QuantStub,
    blocks: Vec<Block>,
    pool: MaxPool2d,
    flatten: Flatten,
    fc: Linear,
    bn_fc: BatchNorm1d,
    #[qat(skip)]
    #[allow(dead_code)]
    dropout: f64,
    fc2: Linear,
    relu: ReLU,
    dequant: DeQuantStub,
}

/// The same layers, groups found by auto_fuse.
#[derive(Quantizable)]
#[qat(auto_fuse)]
struct AutoBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    relu1: ReLU,
}

#[derive(Quantizable)]
#[qat(auto_fuse)]
struct AutoNet {
    quant: QuantStub,
    blocks: Vec<AutoBlock>,
    pool: MaxPool2d,
    flatten: Flatten,
    fc: Linear,
    bn_fc: BatchNorm1d,
    #[qat(skip)]
    #[allow(dead_code)]
    dropout: f64,
    fc2: Linear,
    relu: ReLU,
    dequant: DeQuantStub,
}

fn net() -> Res<Net> {
    Ok(Net {
        quant: QuantStub::new(),
        blocks: vec![Block::new(2)?, Block::new(2)?],
        pool: MaxPool2d::new(2, 2)?,
        flatten: Flatten::new(1),
        fc: Linear::new(8, 4, true, vb())?,
        bn_fc: BatchNorm1d::new(4, BatchNormConfig::default(), vb())?,
        dropout: 0.1,
        fc2: Linear::new(4, 3, true, vb())?,
        relu: ReLU::new(),
        dequant: DeQuantStub::new(),
    })
}

fn auto_net() -> Res<AutoNet> {
    let n = net()?;
    Ok(AutoNet {
        quant: n.quant,
        blocks: n
            .blocks
            .into_iter()
            .map(|b| AutoBlock {
                conv1: b.conv1,
                bn1: b.bn1,
                relu1: b.relu1,
            })
            .collect(),
        pool: n.pool,
        flatten: n.flatten,
        fc: n.fc,
        bn_fc: n.bn_fc,
        dropout: n.dropout,
        fc2: n.fc2,
        relu: n.relu,
        dequant: n.dequant,
    })
}

fn listing<M: Quantizable>(m: &M) -> Res<Vec<(String, String, Stage)>> {
    Ok(named_modules(m)?
        .into_iter()
        .map(|i| (i.path, i.kind, i.stage))
        .collect())
}

fn paths_kinds<M: Quantizable>(m: &M) -> Res<Vec<(String, String)>> {
    Ok(listing(m)?.into_iter().map(|(p, k, _)| (p, k)).collect())
}

fn pk(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(p, k)| (p.to_string(), k.to_string()))
        .collect()
}

#[test]
fn module_paths_follow_pytorch() -> Res<()> {
    let n = net()?;
    assert_eq!(
        paths_kinds(&n)?,
        pk(&[
            ("quant", "QuantStub"),
            ("blocks.0.conv1", "Conv2d"),
            ("blocks.0.bn1", "BatchNorm2d"),
            ("blocks.0.relu1", "ReLU"),
            ("blocks.1.conv1", "Conv2d"),
            ("blocks.1.bn1", "BatchNorm2d"),
            ("blocks.1.relu1", "ReLU"),
            ("pool", "MaxPool2d"),
            ("flatten", "Flatten"),
            ("fc", "Linear"),
            ("bn_fc", "BatchNorm1d"),
            ("fc2", "Linear"),
            ("relu", "ReLU"),
            ("dequant", "DeQuantStub"),
        ])
    );
    Ok(())
}

const FUSED_QAT: &[(&str, &str)] = &[
    ("quant", "QuantStub"),
    ("blocks.0.conv1", "ConvBnReLU2d"),
    ("blocks.0.bn1", "Identity"),
    ("blocks.0.relu1", "Identity"),
    ("blocks.1.conv1", "ConvBnReLU2d"),
    ("blocks.1.bn1", "Identity"),
    ("blocks.1.relu1", "Identity"),
    ("pool", "MaxPool2d"),
    ("flatten", "Flatten"),
    ("fc", "LinearBn1d"),
    ("bn_fc", "Identity"),
    ("fc2", "LinearReLU"),
    ("relu", "Identity"),
    ("dequant", "DeQuantStub"),
];

#[test]
fn fuse_modules_qat_fuses_every_declared_group() -> Res<()> {
    let mut n = net()?;
    fuse_modules_qat(&mut n)?;
    assert_eq!(paths_kinds(&n)?, pk(FUSED_QAT));
    for (path, _, stage) in listing(&n)? {
        let fused = !matches!(path.as_str(), "quant" | "pool" | "flatten" | "dequant");
        assert_eq!(stage == Stage::Fused, fused, "{path}");
    }
    Ok(())
}

#[test]
fn fuse_modules_folds_bn_in_eval_mode() -> Res<()> {
    let mut n = net()?;
    fuse_modules(&mut n)?;
    let kinds = paths_kinds(&n)?;
    assert_eq!(kinds[1], ("blocks.0.conv1".into(), "ConvReLU2d".into()));
    assert_eq!(kinds[9], ("fc".into(), "Linear".into()));
    assert_eq!(kinds[10], ("bn_fc".into(), "Identity".into()));
    Ok(())
}

#[test]
fn fusion_groups_list_the_declared_groups() -> Res<()> {
    let n = net()?;
    assert_eq!(
        n.fusion_groups(),
        vec![vec!["fc", "bn_fc"], vec!["fc2", "relu"]]
    );
    assert_eq!(
        n.blocks[0].fusion_groups(),
        vec![vec!["conv1", "bn1", "relu1"]]
    );
    assert_eq!(
        Box::new(Block::new(1)?).fusion_groups(),
        vec![vec!["conv1", "bn1", "relu1"]]
    );
    Ok(())
}

#[test]
fn auto_fuse_matches_the_declared_groups() -> Res<()> {
    let (mut declared, mut auto) = (net()?, auto_net()?);
    assert_eq!(auto.fusion_groups(), declared.fusion_groups());
    assert_eq!(
        auto.blocks[0].fusion_groups(),
        declared.blocks[0].fusion_groups()
    );
    fuse_modules_qat(&mut declared)?;
    fuse_modules_qat(&mut auto)?;
    assert_eq!(listing(&auto)?, listing(&declared)?);
    assert_eq!(paths_kinds(&auto)?, pk(FUSED_QAT));
    Ok(())
}

#[test]
fn fusing_twice_is_an_error() -> Res<()> {
    let mut n = net()?;
    fuse_modules_qat(&mut n)?;
    // The struct's own groups are fused before its fields', so `fc` is the first refusal.
    let e = fuse_modules_qat(&mut n).unwrap_err().to_string();
    assert!(e.contains("in module `fc`"), "{e}");
    assert!(e.contains("already fused"), "{e}");
    let e = fuse_modules_qat(&mut n.blocks).unwrap_err().to_string();
    assert!(e.contains("in module `0.conv1`"), "{e}");
    assert!(e.contains("already fused"), "{e}");
    Ok(())
}

/// Applies `relu1` to something other than `bn1`'s output.
fn misordered_forward(b: &Block, x: &Tensor) -> candle_core::Result<Tensor> {
    let y = b.bn1.forward(&b.conv1.forward(x)?)?;
    b.relu1.forward(&(y + 1.0)?)
}

#[test]
fn fusion_order_is_checked_in_training() -> Res<()> {
    let mut b = Block::new(2)?;
    let x = Tensor::randn(0f32, 1., (2, 2, 4, 4), &Device::Cpu)?;
    // Unfused, any order is the user's business.
    misordered_forward(&b, &x)?;
    fuse_modules_qat(&mut b)?;
    // The declared order passes ...
    b.forward(&x)?;
    // ... another one is caught.
    let e = misordered_forward(&b, &x).unwrap_err().to_string();
    assert!(
        e.contains(
            "fused group (conv1, bn1, relu1): `relu1` was not applied to the output of `bn1`"
        ),
        "{e}"
    );
    Ok(())
}

#[test]
fn fusion_order_error_names_the_nested_group() -> Res<()> {
    let mut n = net()?;
    fuse_modules_qat(&mut n)?;
    let x = Tensor::randn(0f32, 1., (2, 2, 4, 4), &Device::Cpu)?;
    let e = misordered_forward(&n.blocks[1], &x)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fused group (blocks.1.conv1, blocks.1.bn1, blocks.1.relu1)"),
        "{e}"
    );
    Ok(())
}

#[derive(Quantizable)]
#[qat(fuse(0, 1))]
struct Stem(Conv2d, ReLU);

#[derive(Quantizable)]
struct Wrapper(Stem, #[qat(skip)] f32, Option<Stem>, [ReLU; 2]);

#[test]
fn tuple_struct_fields_are_named_by_index() -> Res<()> {
    let mut w = Wrapper(
        Stem(conv(1, 2)?, ReLU::new()),
        0.5,
        None,
        [ReLU::new(), ReLU::new()],
    );
    assert_eq!(w.0.fusion_groups(), vec![vec!["0", "1"]]);
    assert_eq!(w.1, 0.5);
    fuse_modules_qat(&mut w)?;
    assert_eq!(
        paths_kinds(&w)?,
        pk(&[
            ("0.0", "ConvReLU2d"),
            ("0.1", "Identity"),
            ("3.0", "ReLU"),
            ("3.1", "ReLU"),
        ])
    );
    w.2 = Some(Stem(conv(1, 2)?, ReLU::new()));
    fuse_modules_qat(&mut w.2)?;
    let paths: Vec<String> = listing(&w)?.into_iter().map(|(p, _, _)| p).collect();
    assert_eq!(paths, ["0.0", "0.1", "2.0", "2.1", "3.0", "3.1"]);
    Ok(())
}

#[derive(Quantizable)]
struct Generic<B> {
    blocks: Vec<B>,
    head: Box<Linear>,
}

#[test]
fn generic_structs_walk_their_parameter_fields() -> Res<()> {
    let mut g = Generic {
        blocks: vec![Block::new(1)?],
        head: Box::new(Linear::new(2, 2, false, vb())?),
    };
    fuse_modules_qat(&mut g)?;
    assert_eq!(
        paths_kinds(&g)?,
        pk(&[
            ("blocks.0.conv1", "ConvBnReLU2d"),
            ("blocks.0.bn1", "Identity"),
            ("blocks.0.relu1", "Identity"),
            ("head", "Linear"),
        ])
    );
    assert_eq!(<Generic<Block> as Named>::TYPE_NAME, "Generic");
    Ok(())
}

/// Records the walk.
struct Trace(Vec<String>);

impl ModuleVisitorMut for Trace {
    fn layer(&mut self, path: &ModulePath, _: &mut dyn QuantModule) -> candle_qat::Result<()> {
        self.0.push(format!("layer {path}"));
        Ok(())
    }
    fn enter(&mut self, path: &ModulePath, type_name: &'static str) -> candle_qat::Result<()> {
        self.0.push(format!("enter {path} {type_name}"));
        Ok(())
    }
    fn leave(&mut self, path: &ModulePath) -> candle_qat::Result<()> {
        self.0.push(format!("leave {path}"));
        Ok(())
    }
}

#[test]
fn visit_mut_enters_and_leaves_each_struct() -> Res<()> {
    let mut g = Generic {
        blocks: vec![Block::new(1)?],
        head: Box::new(Linear::new(2, 2, false, vb())?),
    };
    let mut t = Trace(Vec::new());
    g.visit_mut(&mut ModulePath::root(), &mut t)?;
    assert_eq!(
        t.0,
        [
            "enter <root> Generic",
            "enter blocks.0 Block",
            "layer blocks.0.conv1",
            "layer blocks.0.bn1",
            "layer blocks.0.relu1",
            "leave blocks.0",
            "layer head",
            "leave <root>",
        ]
    );
    Ok(())
}

#[test]
fn derived_type_names_drive_the_qconfig_mapping() -> Res<()> {
    let qc = QConfig::default_qat(Backend::X86);
    let mut n = net()?;
    fuse_modules_qat(&mut n)?;
    // Blocks stay float, by their derived type name; the rest is prepared.
    prepare_qat(&mut n, &QConfigMapping::global(qc).set_type::<Block>(None))?;
    for m in named_modules(&n)? {
        assert_eq!(
            m.qconfig.is_none(),
            m.path.starts_with("blocks."),
            "{}",
            m.path
        );
    }
    Ok(())
}

/// A user's own layer, fused through `FuseWith` (see tests/ui/pass/custom_fusion.rs).
#[derive(Quantizable)]
struct MyConv {
    conv: Conv2d,
}

impl<'a> candle_qat::fuse::FuseWith<(&'a mut BatchNorm2d, &'a mut ReLU)> for MyConv {
    fn fuse_with(
        &mut self,
        rest: (&'a mut BatchNorm2d, &'a mut ReLU),
        group: &candle_qat::fuse::FuseGroup,
    ) -> candle_qat::Result<()> {
        candle_qat::fuse::FuseWith::fuse_with(&mut self.conv, rest, group)
    }
}

#[derive(Quantizable)]
#[qat(fuse(mine, bn, relu))]
struct WithMine {
    mine: MyConv,
    bn: BatchNorm2d,
    relu: ReLU,
}

#[test]
fn a_user_layer_fuses_through_fuse_with() -> Res<()> {
    let mut m = WithMine {
        mine: MyConv { conv: conv(2, 2)? },
        bn: bn2(2)?,
        relu: ReLU::new(),
    };
    fuse_modules_qat(&mut m)?;
    assert_eq!(
        paths_kinds(&m)?,
        pk(&[
            ("mine.conv", "ConvBnReLU2d"),
            ("bn", "Identity"),
            ("relu", "Identity")
        ])
    );
    // The group's order check names the user's members.
    let x = Tensor::randn(0f32, 1., (2, 2, 4, 4), &Device::Cpu)?;
    let y = m.mine.conv.forward(&x)?;
    m.relu.forward(&m.bn.forward(&y)?)?;
    let e = m.relu.forward(&x).unwrap_err().to_string();
    assert!(
        e.contains("fused group (mine, bn, relu): `relu` was not applied to the output of `bn`"),
        "{e}"
    );
    Ok(())
}
