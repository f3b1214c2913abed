//! Transformer schemes through the pipeline: one mapping mixing an eager conv stem with
//! torchao-style Linears; where each scheme applies (Linear inputs and weights, Embedding
//! tables, weightless layers float); prepare-time errors naming the module; GGML convert to
//! candle's `QMatMul` with the same blocks and values; intx convert refused; range learning
//! (initialise, train, save and load).

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use candle_qat::checkpoint::{load_qat_checkpoint, save_int8, save_qat_checkpoint};
use candle_qat::fake_quant::IntxFakeQuantizer;
use candle_qat::ggml::{fake_quantize_ggml, fake_quantize_vec_dot, quantize_blocks};
use candle_qat::model::QuantModule;
use candle_qat::onnx::{to_onnx, ExportOptions};
use candle_qat::passes::convert;
use candle_qat::prelude::*;

/// An eager conv stem (QuantStub, Conv2d, ReLU, DeQuantStub) feeding torchao-style Linears
/// through an RmsNorm and SiLU; a token Embedding beside it.
#[derive(Clone, Quantizable)]
struct Mixed {
    quant: QuantStub,
    conv: Conv2d,
    relu: ReLU,
    dequant: DeQuantStub,
    embed: Embedding,
    norm: RmsNorm,
    fc1: Linear,
    act: SiLU,
    fc2: Linear,
}

impl Mixed {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        Ok(Mixed {
            quant: QuantStub::new(),
            conv: Conv2d::new(1, 2, 3, ConvConfig::default(), true, vb.pp("conv"))?,
            relu: ReLU::new(),
            dequant: DeQuantStub::new(),
            embed: Embedding::new(10, 64, vb.pp("embed"))?,
            norm: RmsNorm::new(64, 1e-5, vb.pp("norm"))?,
            fc1: Linear::new(64, 96, false, vb.pp("fc1"))?,
            act: SiLU::new(),
            fc2: Linear::new(96, 32, true, vb.pp("fc2"))?,
        })
    }

    /// `img`: (b, 1, 10, 10) -> conv features (b, 2*8*4=64 after flattening 2x8x8 -> 128;
    /// we keep 64 of them); `ids`: (b, t) -> embeddings (b, t, 64) plus the features.
    fn forward(&self, img: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        let f = self.quant.forward(img)?;
        let f = self
            .dequant
            .forward(&self.relu.forward(&self.conv.forward(&f)?)?)?;
        let f = f.flatten_from(1)?.narrow(1, 0, 64)?.unsqueeze(1)?;
        let x = self.embed.forward(ids)?.broadcast_add(&f)?;
        let h = self
            .act
            .forward(&self.fc1.forward(&self.norm.forward(&x)?)?)?;
        self.fc2.forward(&h)
    }
}

fn model() -> (Mixed, VarMap) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    (Mixed::new(vb).unwrap(), vm)
}

fn inputs() -> (Tensor, Tensor) {
    let img = Tensor::randn(0f32, 1.0, (2, 1, 10, 10), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3], [4, 5, 9]], &Device::Cpu).unwrap();
    (img, ids)
}

fn eight_da_four_w() -> QConfig {
    QConfig::int8_dynamic_activation_int4_weight(32).unwrap()
}

#[test]
fn one_mapping_mixes_an_eager_stem_with_torchao_linears() {
    let (mut m, _vm) = model();
    let mapping = qconfig_mapping! {
        global => eight_da_four_w(),
        path "quant" => QConfig::default_qat(Backend::X86),
        path "conv" => QConfig::default_qat(Backend::X86),
        path "relu" => QConfig::default_qat(Backend::X86),
        path "dequant" => QConfig::default_qat(Backend::X86),
    };
    prepare_qat(&mut m, &mapping).unwrap();
    let mods = named_modules(&m).unwrap();
    let get = |p: &str| mods.iter().find(|i| i.path == p).unwrap();
    // The conv stem is eager: weight and output fake-quants.
    assert_eq!(get("conv").stage, Stage::Prepared);
    assert_eq!(get("conv").fake_quants.len(), 2);
    // The Linears take 8da4w: no eager fake-quant (the output stays float).
    assert_eq!(get("fc1").stage, Stage::Prepared);
    assert!(get("fc1").fake_quants.is_empty());
    assert!(matches!(
        get("fc1").qconfig.unwrap().scheme,
        Scheme::Intx { input: Some(_), .. }
    ));
    // Weightless layers and the Embedding (8da4w quantizes inputs: a Linear scheme) stay float.
    for p in ["norm", "act", "embed"] {
        assert_eq!(get(p).stage, Stage::Float, "{p}");
    }
    let s = summary(&m).unwrap();
    assert!(
        s.contains("intx input int8/tok/asym weight int4/g32/sym"),
        "{s}"
    );

    // The Linear computes intx(x) @ intx(w)^T exactly as the quantizers do by hand.
    let (img, ids) = inputs();
    let y = m.forward(&img, &ids).unwrap();
    assert_eq!(y.dims(), &[2, 3, 32]);
    let x = m
        .act
        .forward(
            &m.fc1
                .forward(
                    &m.norm
                        .forward(
                            &(m.embed
                                .forward(&ids)
                                .unwrap()
                                .broadcast_add(
                                    &m.dequant
                                        .forward(
                                            &m.relu
                                                .forward(
                                                    &m.conv
                                                        .forward(&m.quant.forward(&img).unwrap())
                                                        .unwrap(),
                                                )
                                                .unwrap(),
                                        )
                                        .unwrap()
                                        .flatten_from(1)
                                        .unwrap()
                                        .narrow(1, 0, 64)
                                        .unwrap()
                                        .unsqueeze(1)
                                        .unwrap(),
                                )
                                .unwrap()),
                        )
                        .unwrap(),
                )
                .unwrap(),
        )
        .unwrap();
    let mut aq = IntxFakeQuantizer::new(IntxSpec::int8_per_token_asym());
    let mut wq = IntxFakeQuantizer::new(IntxSpec::int4_per_group(32).unwrap());
    let want = aq
        .forward(&x)
        .unwrap()
        .broadcast_matmul(&wq.forward(m.fc2.weight()).unwrap().t().unwrap())
        .unwrap()
        .broadcast_add(m.fc2.bias().unwrap())
        .unwrap();
    let d = (y - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "{d}");
}

#[test]
fn embedding_takes_weight_only_schemes() {
    let (mut m, _vm) = model();
    let mapping = QConfigMapping::global(eight_da_four_w())
        .set_type::<Embedding>(QConfig::intx_weight_only(IntxSpec::int8_per_axis()))
        .set_path("quant", None)
        .set_path("conv", None)
        .set_path("relu", None)
        .set_path("dequant", None);
    prepare_qat(&mut m, &mapping).unwrap();
    assert_eq!(m.embed.stage(), Stage::Prepared);
    let ids = Tensor::new(&[[3u32, 7]], &Device::Cpu).unwrap();
    let got = m.embed.forward(&ids).unwrap();
    let table = IntxFakeQuantizer::new(IntxSpec::int8_per_axis())
        .forward(m.embed.weight())
        .unwrap();
    let want = table.index_select(&ids.flatten_all().unwrap(), 0).unwrap();
    assert_eq!(
        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // The table is not the float one (int8 per axis moved values), and convert keeps it.
    assert_ne!(
        table.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        m.embed
            .weight()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
}

fn assert_config_error(e: Error, path: &str, needle: &str) {
    let s = e.to_string();
    assert!(
        s.contains(path) && s.contains(needle),
        "expected `{path}` and `{needle}` in: {s}"
    );
}

#[test]
fn prepare_errors_name_the_module_and_change_nothing() {
    // A group size that does not divide in_features (fc2 has 96 inputs: 64 does not divide).
    let (mut m, _vm) = model();
    let mapping = QConfigMapping::global(QConfig::int8_dynamic_activation_int4_weight(64).unwrap())
        .set_path("quant", None)
        .set_path("conv", None)
        .set_path("relu", None)
        .set_path("dequant", None);
    let e = prepare_qat(&mut m, &mapping).unwrap_err();
    assert_config_error(e, "fc2", "group size 64 does not divide");
    assert_eq!(
        m.fc1.stage(),
        Stage::Float,
        "an error leaves the model as it was"
    );

    // A scheme on a layer that cannot take it (the conv).
    let mapping = QConfigMapping::global(eight_da_four_w());
    let e = prepare_qat(&mut m, &mapping).unwrap_err();
    assert_config_error(e, "quant", "cannot take the transformer scheme");
    let mapping = QConfigMapping::global(eight_da_four_w()).set_path("quant", None);
    let e = prepare_qat(&mut m, &mapping).unwrap_err();
    assert_config_error(e, "conv", "set_type::<Conv2d>(None)");

    // Per token on a weight.
    let tok = IntxSpec::int8_per_token_asym();
    let mapping = QConfigMapping::new().set_path("fc1", QConfig::intx(None, tok));
    let e = prepare_qat(&mut m, &mapping).unwrap_err();
    assert_config_error(e, "fc1", "per-token intx scheme on a weight");

    // A per-group input scheme.
    let w4 = IntxSpec::int4_per_group(32).unwrap();
    let mapping = QConfigMapping::new().set_path("fc1", QConfig::intx(Some(w4), w4));
    let e = prepare_qat(&mut m, &mapping).unwrap_err();
    assert_config_error(e, "fc1", "not per token");

    // K-quants need in_features % 256 == 0.
    let mapping = QConfigMapping::new().set_path("fc1", QConfig::ggml(BlockType::Q4K));
    let e = prepare_qat(&mut m, &mapping).unwrap_err();
    assert_config_error(e, "fc1", "K-quants need in_features % 256 == 0");

    // An embedding dim that GGML blocks do not tile, an eager qconfig on the Embedding.
    let vm = VarMap::new();
    let mut e40 = Embedding::new(
        5,
        40,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let e = prepare_qat(
        &mut e40,
        &QConfigMapping::global(QConfig::ggml_weight_only(BlockType::Q8_0)),
    )
    .unwrap_err();
    assert!(e.to_string().contains("embedding dim divisible"), "{e}");
    let e = prepare_qat(
        &mut e40,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
    )
    .unwrap_err();
    assert!(e.to_string().contains("has no int8 form"), "{e}");
    assert_eq!(e40.stage(), Stage::Float);
}

/// Two Linears under Q4_0 (fc1: 64 -> 96) and Q8_0 (fc2: 96 -> 32).
#[derive(Clone, Quantizable)]
struct Mlp {
    fc1: Linear,
    act: SiLU,
    fc2: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}

fn mlp(vm: &VarMap) -> Mlp {
    let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    Mlp {
        fc1: Linear::new(64, 96, false, vb.pp("fc1")).unwrap(),
        act: SiLU::new(),
        fc2: Linear::new(96, 32, true, vb.pp("fc2")).unwrap(),
    }
}

fn rel_max(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let m = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / m
}

#[test]
fn ggml_linears_convert_to_qmatmul_with_the_same_blocks() {
    let vm = VarMap::new();
    let mut m = mlp(&vm);
    let mapping = QConfigMapping::global(QConfig::ggml(BlockType::Q4_0))
        .set_path("fc2", QConfig::ggml(BlockType::Q8_0));
    prepare_qat(&mut m, &mapping).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 5, 64), &Device::Cpu).unwrap();
    let fq = m.forward(&x).unwrap();
    // The prepared Linear is vec-dot(x) @ ggml(w)^T.
    let want1 = fake_quantize_vec_dot(&x, BlockType::Q4_0.vec_dot_type())
        .unwrap()
        .broadcast_matmul(
            &fake_quantize_ggml(m.fc1.weight(), BlockType::Q4_0)
                .unwrap()
                .t()
                .unwrap(),
        )
        .unwrap();
    let got1 = m.fc1.forward(&x).unwrap();
    assert!(rel_max(&got1, &want1) < 1e-6);

    let w1 = m.fc1.weight().clone();
    convert(&mut m).unwrap();
    assert_eq!(m.fc1.stage(), Stage::Converted);
    let q = m.fc1.ggml_weight().expect("a GGML weight").clone();
    assert_eq!(q.dtype(), BlockType::Q4_0.dtype());
    assert_eq!(
        q.data().unwrap().to_vec(),
        quantize_blocks(&w1, BlockType::Q4_0).unwrap()
    );
    // Converted (candle's QMatMul) vs fake-quant: f32 summation order, and an occasional Q8_0
    // activation code of fc2's input flipped by it.
    let conv1 = m.fc1.forward(&x).unwrap();
    assert!(rel_max(&conv1, &got1) < 1e-6, "{}", rel_max(&conv1, &got1));
    let deployed = m.forward(&x).unwrap();
    assert!(
        rel_max(&deployed, &fq) < 1e-3,
        "{}",
        rel_max(&deployed, &fq)
    );
    // It deploys as GGUF: the int8 file and ONNX QDQ refuse it, naming the layer.
    let dir = std::env::temp_dir().join(format!("candle-qat-ggml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = save_int8(&mut m, dir.join("m.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc1") && e.contains("GGUF"), "{e}");
    let e = to_onnx(&m, |m, x| m.forward(x), &x, &ExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc1") && e.contains("GGUF"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    // Exactly what candle's own QMatMul over the same blocks computes.
    let own = QMatMul::from_arc(q.clone()).unwrap().forward(&x).unwrap();
    assert_eq!(
        own.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        conv1.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn intx_and_weight_only_ggml_linears_refuse_convert_and_stay_prepared() {
    let vm = VarMap::new();
    let mut m = mlp(&vm);
    prepare_qat(
        &mut m,
        &QConfigMapping::global(QConfig::int4_weight_only(32).unwrap()),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
    m.forward(&x).unwrap();
    let e = convert(&mut m).unwrap_err().to_string();
    assert!(
        e.contains("fc1") && e.contains("torchao intx scheme"),
        "{e}"
    );
    assert_eq!(m.fc1.stage(), Stage::Prepared);

    let mut m = mlp(&vm);
    prepare_qat(
        &mut m,
        &QConfigMapping::global(QConfig::ggml_weight_only(BlockType::Q8_0)),
    )
    .unwrap();
    let e = convert(&mut m).unwrap_err().to_string();
    assert!(e.contains("weight-only GGML scheme"), "{e}");
    assert_eq!(m.fc2.stage(), Stage::Prepared);
}

#[test]
fn range_learning_initialises_trains_saves_and_loads() {
    let vm = VarMap::new();
    let mut m = mlp(&vm);
    let w4 = IntxSpec::builder(4)
        .per_group(32)
        .asymmetric()
        .dynamic(false)
        .range_learning(true)
        .build()
        .unwrap();
    let qc = QConfig::intx(Some(IntxSpec::int8_per_token_asym()), w4);
    prepare_qat(&mut m, &QConfigMapping::global(qc)).unwrap();
    let x = Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu).unwrap();
    // Before initialisation the forward says what to do.
    let e = m.forward(&x).unwrap_err().to_string();
    assert!(e.contains("initialize"), "{e}");
    initialize_fake_quantizers(&mut m).unwrap();
    let learn = learnable_parameters(&mut m).unwrap();
    let names: Vec<&str> = learn.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "fc1.weight_fake_quantizer.scale",
            "fc1.weight_fake_quantizer.zero_point",
            "fc2.weight_fake_quantizer.scale",
            "fc2.weight_fake_quantizer.zero_point"
        ]
    );
    let before = learn[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut vars = vm.all_vars();
    vars.extend(learn.iter().map(|(_, v)| v.clone()));
    let mut opt = SGD::new(vars, 0.05).unwrap();
    let target = Tensor::randn(0f32, 1.0, (4, 32), &Device::Cpu).unwrap();
    for _ in 0..3 {
        let loss = (m.forward(&x).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        opt.backward_step(&loss).unwrap();
    }
    let after = learn[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(before, after, "the scales trained");

    // Save and load into a freshly prepared, initialised model: same outputs.
    let dir = std::env::temp_dir().join(format!("candle-qat-rl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("qat.safetensors");
    save_qat_checkpoint(&mut m, &vm, &file).unwrap();
    let vm2 = VarMap::new();
    let mut m2 = mlp(&vm2);
    prepare_qat(&mut m2, &QConfigMapping::global(qc)).unwrap();
    initialize_fake_quantizers(&mut m2).unwrap();
    load_qat_checkpoint(&mut m2, &vm2, &file).unwrap();
    let (a, b) = (m.forward(&x).unwrap(), m2.forward(&x).unwrap());
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // A model whose quantizer holds qparams refuses a file without them.
    let vm3 = VarMap::new();
    let mut float_file_model = mlp(&vm3);
    let plain = dir.join("plain.safetensors");
    prepare_qat(
        &mut float_file_model,
        &QConfigMapping::global(QConfig::int4_weight_only(32).unwrap()),
    )
    .unwrap();
    save_qat_checkpoint(&mut float_file_model, &vm3, &plain).unwrap();
    let e = load_qat_checkpoint(&mut m2, &vm2, &plain)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("holds static qparams but the file has none"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
