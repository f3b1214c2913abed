//! Turns a trace into an ONNX graph in the QDQ format: activations travel as uint8 tensors,
//! each consumer reads them through `DequantizeLinear` with the qparams it was converted
//! with, float ops run on the dequantized values, and `QuantizeLinear` writes the codes of
//! the next activation. Where uint8 saturation alone would not keep an activation inside the
//! code range it trained with (0..127 under `reduce_range`, or the zero point upwards after a
//! fused ReLU), a `DequantizeLinear -> Clip -> QuantizeLinear` follows.

use std::collections::HashMap;

use candle_core::TensorId;

use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, NodeProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use crate::error::{Error, Result};
use crate::model::hook::Event;
use crate::record::IoQParams;
use crate::record::{FloatOp, Op, WeightCodes, WeightedKind};

/// A tensor of the exported graph.
#[derive(Clone, Debug)]
enum Value {
    /// A float tensor.
    Float(String),
    /// A uint8 tensor of codes with their qparams.
    Quant { name: String, qp: IoQParams },
}

/// Where each recorded layer lives in the model.
pub(crate) struct LayerInfo {
    pub path: String,
    pub kind: String,
}

/// Builds the graph node by node.
pub(crate) struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    values: HashMap<TensorId, Value>,
    dequantized: HashMap<(String, u32, i32), String>,
    used: HashMap<String, usize>,
    per_tensor_weights: bool,
    /// Layers whose per-channel weights were requantized per tensor.
    pub requantized: Vec<String>,
}

fn raw<T: Copy, const N: usize>(v: &[T], bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| bytes(x)).collect()
}

fn tensor(name: &str, dims: &[usize], data_type: DataType, raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(data_type as i32),
        raw_data: Some(raw_data),
        ..Default::default()
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(i),
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn attr_string(name: &str, s: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(s.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(f),
        ..Default::default()
    }
}

/// A graph input or output: its element type and shape, the batch dim symbolic if asked.
pub(crate) fn value_info(
    name: &str,
    data_type: DataType,
    dims: &[usize],
    dynamic_batch: bool,
) -> ValueInfoProto {
    let dim = dims
        .iter()
        .enumerate()
        .map(|(i, &d)| tensor_shape_proto::Dimension {
            value: Some(if i == 0 && dynamic_batch {
                tensor_shape_proto::dimension::Value::DimParam("batch".into())
            } else {
                tensor_shape_proto::dimension::Value::DimValue(d as i64)
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(data_type as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl GraphBuilder {
    pub fn new(input: TensorId, input_name: &str, per_tensor_weights: bool) -> Self {
        let mut values = HashMap::new();
        values.insert(input, Value::Float(input_name.to_string()));
        GraphBuilder {
            nodes: Vec::new(),
            initializers: Vec::new(),
            values,
            dequantized: HashMap::new(),
            used: HashMap::new(),
            per_tensor_weights,
            requantized: Vec::new(),
        }
    }

    /// A name not used before, `base` the first time.
    fn fresh(&mut self, base: &str) -> String {
        let n = self.used.entry(base.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 {
            base.to_string()
        } else {
            format!("{base}_{n}")
        }
    }

    fn node(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<AttributeProto>,
    ) {
        let name = self.fresh(&format!("{name}/{op_type}"));
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: Some(name),
            op_type: Some(op_type.into()),
            attribute,
            ..Default::default()
        });
    }

    fn init(&mut self, name: &str, dims: &[usize], data_type: DataType, raw: Vec<u8>) -> String {
        let name = self.fresh(name);
        self.initializers.push(tensor(&name, dims, data_type, raw));
        name
    }

    fn init_f32(&mut self, name: &str, dims: &[usize], v: &[f32]) -> String {
        self.init(name, dims, DataType::Float, raw(v, f32::to_le_bytes))
    }

    /// Scale and zero point initializers of an activation.
    fn act_qparams(&mut self, base: &str, qp: &IoQParams) -> (String, String) {
        let s = self.init_f32(&format!("{base}_scale"), &[], &[qp.scale]);
        let z = self.init(
            &format!("{base}_zero_point"),
            &[],
            DataType::Uint8,
            vec![qp.zero_point as u8],
        );
        (s, z)
    }

    /// The float view of codes `name` read with `qp` (one DequantizeLinear per pair).
    fn dequantize(&mut self, name: &str, qp: &IoQParams) -> String {
        let key = (name.to_string(), qp.scale.to_bits(), qp.zero_point);
        if let Some(n) = self.dequantized.get(&key) {
            return n.clone();
        }
        let (s, z) = self.act_qparams(name, qp);
        let out = self.fresh(&format!("{name}_dequantized"));
        self.node("DequantizeLinear", name, &[name, &s, &z], &out, vec![]);
        self.dequantized.insert(key, out.clone());
        out
    }

    /// Codes of the float tensor `y` with `qp`, kept inside the trained range (and at or above
    /// the zero point with a fused ReLU). QuantizeLinear saturates to 0..255; a narrower range
    /// follows as DequantizeLinear -> Clip -> QuantizeLinear, which leaves the
    /// DequantizeLinear -> op -> QuantizeLinear group in front of it intact for runtimes that
    /// fuse such groups into integer kernels (a Clip between op and QuantizeLinear blocks
    /// onnxruntime's fusion).
    fn quantize(&mut self, path: &str, y: &str, qp: &IoQParams, relu: bool) -> String {
        let lo = if relu {
            qp.quant_min.max(qp.zero_point)
        } else {
            qp.quant_min
        };
        let hi = qp.quant_max;
        let (s, z) = self.act_qparams(&format!("{path}.output"), qp);
        let full = lo == 0 && hi == 255;
        let q = self.fresh(&format!(
            "{path}.output{}",
            if full { "" } else { "_saturated" }
        ));
        self.node("QuantizeLinear", path, &[y, &s, &z], &q, vec![]);
        if full {
            return q;
        }
        let d = self.fresh(&format!("{path}.output_saturated_dequantized"));
        self.node("DequantizeLinear", path, &[&q, &s, &z], &d, vec![]);
        let bound = |c: i32| (c - qp.zero_point) as f32 * qp.scale;
        let min = self.init_f32(&format!("{path}.clip_min"), &[], &[bound(lo)]);
        let max = self.init_f32(&format!("{path}.clip_max"), &[], &[bound(hi)]);
        let c = self.fresh(&format!("{path}.clipped"));
        self.node("Clip", path, &[&d, &min, &max], &c, vec![]);
        let out = self.fresh(&format!("{path}.output"));
        self.node("QuantizeLinear", path, &[&c, &s, &z], &out, vec![]);
        out
    }

    fn input(&self, id: TensorId, layer: &LayerInfo) -> Result<Value> {
        self.values.get(&id).cloned().ok_or_else(|| {
            Error::tensor(
                format!(
                    "cannot export {} ({}): its input was computed by an operation the exporter \
                     did not see (a candle op on tensors between candle-qat layers)",
                    layer.path, layer.kind
                ),
                "express it with candle-qat layers (Flatten instead of a reshape, \
                 FloatFunctional for add/mul/cat) or move it out of the exported forward",
            )
        })
    }

    fn float_input(&self, id: TensorId, layer: &LayerInfo) -> Result<String> {
        match self.input(id, layer)? {
            Value::Float(n) => Ok(n),
            Value::Quant { .. } => Err(Error::tensor(
                format!(
                    "cannot export {} ({}): a float op fed codes",
                    layer.path, layer.kind
                ),
                "insert a DeQuantStub before float layers inside a converted model",
            )),
        }
    }

    fn quant_input(&self, id: TensorId, layer: &LayerInfo) -> Result<(String, IoQParams)> {
        match self.input(id, layer)? {
            Value::Quant { name, qp } => Ok((name, qp)),
            Value::Float(_) => Err(Error::tensor(
                format!(
                    "cannot export {} ({}): a converted layer fed a float tensor",
                    layer.path, layer.kind
                ),
                "insert a QuantStub where float tensors enter the quantized region",
            )),
        }
    }

    /// Adds one recorded step.
    pub fn add(&mut self, e: &Event, layer: &LayerInfo) -> Result<()> {
        let path = layer.path.as_str();
        let value = match &e.op {
            Op::Quantize(qp) => {
                let x = self.float_input(e.inputs[0], layer)?;
                Value::Quant {
                    name: self.quantize(path, &x, qp, false),
                    qp: *qp,
                }
            }
            Op::IntWeighted {
                kind,
                weight,
                bias_float,
                bias_int,
                input,
                output,
                relu,
            } => {
                let (xq, _) = self.quant_input(e.inputs[0], layer)?;
                let x = self.dequantize(&xq, input);
                let transposed = match kind {
                    WeightedKind::ConvTranspose { config, .. } => Some(config.groups),
                    _ => None,
                };
                let (w, b) =
                    self.int_weight(path, weight, transposed, bias_float, bias_int, input)?;
                let y = self.weighted(path, *kind, &x, &w, &b, e.output_dims.len(), layer)?;
                Value::Quant {
                    name: self.quantize(path, &y, output, *relu),
                    qp: *output,
                }
            }
            Op::FloatWeighted {
                kind,
                weight,
                bias,
                relu,
            } => {
                let x = self.float_input(e.inputs[0], layer)?;
                let wv: Vec<f32> = weight.flatten_all()?.to_vec1()?;
                let w = self.init_f32(&format!("{path}.weight"), weight.dims(), &wv);
                let b = self.init_f32(&format!("{path}.bias"), &[bias.len()], bias);
                let y = self.weighted(path, *kind, &x, &w, &b, e.output_dims.len(), layer)?;
                Value::Float(if *relu {
                    let out = self.fresh(&format!("{path}.relu"));
                    self.node("Relu", path, &[&y], &out, vec![]);
                    out
                } else {
                    y
                })
            }
            Op::Dequantized { op, inputs, output } => {
                if inputs.len() != e.inputs.len() {
                    return Err(Error::state(
                        format!(
                            "{path}: recorded {} inputs for {} qparams",
                            e.inputs.len(),
                            inputs.len()
                        ),
                        "report this as a bug",
                    ));
                }
                let mut xs = Vec::with_capacity(inputs.len());
                for (&id, qp) in e.inputs.iter().zip(inputs) {
                    let (xq, _) = self.quant_input(id, layer)?;
                    xs.push(self.dequantize(&xq, qp));
                }
                let y = self.float_op(path, op, &xs, &e.output_dims, layer)?;
                match output {
                    Some(qp) => Value::Quant {
                        name: self.quantize(path, &y, qp, false),
                        qp: *qp,
                    },
                    None => Value::Float(y),
                }
            }
            Op::OnCodes(op) => {
                let (xq, qp) = self.quant_input(e.inputs[0], layer)?;
                let name = match op {
                    // max(q, zero point): dequantize, ReLU, quantize with the same qparams. The
                    // codes already lie in the trained range, so uint8 saturation needs no
                    // Clip behind it.
                    FloatOp::Relu => {
                        let x = self.dequantize(&xq, &qp);
                        let y = self.float_op(path, op, &[x], &e.output_dims, layer)?;
                        let full = IoQParams {
                            quant_min: 0,
                            quant_max: 255,
                            ..qp
                        };
                        self.quantize(path, &y, &full, false)
                    }
                    // Max pooling and reshapes commute with dequantization: run on the codes.
                    _ => self.float_op(path, op, &[xq], &e.output_dims, layer)?,
                };
                Value::Quant { name, qp }
            }
            Op::Float(op) => {
                let mut xs = Vec::with_capacity(e.inputs.len());
                for &id in &e.inputs {
                    xs.push(self.float_input(id, layer)?);
                }
                Value::Float(self.float_op(path, op, &xs, &e.output_dims, layer)?)
            }
        };
        self.values.insert(e.output, value);
        Ok(())
    }

    /// Weight codes (per channel on axis 0, or per tensor when asked) and the int32 bias in
    /// units of `input scale * weight scale`, both behind DequantizeLinear. A transposed
    /// convolution's (`transposed: Some(groups)`) weight is written in ONNX's `ConvTranspose`
    /// layout `(in, out / groups, k...)`, per channel on axis 1 (output channel `g * (out /
    /// groups) + j` has scale `j`).
    fn int_weight(
        &mut self,
        path: &str,
        weight: &WeightCodes,
        transposed: Option<usize>,
        bias_float: &[f32],
        bias_int: &[i32],
        input: &IoQParams,
    ) -> Result<(String, String)> {
        let o = weight.out_channels();
        // Codes, shape and scales as written, the per-channel axis, and the scale index of
        // each output channel and of each code.
        let (codes, shape, scales, axis) = match transposed {
            Some(groups) => {
                let (codes, shape) =
                    crate::quantized::to_transposed(&weight.codes, &weight.shape, groups)?;
                let opg = shape[1];
                let scales = weight.scales[..opg.min(weight.scales.len())].to_vec();
                (codes, shape, scales, 1i64)
            }
            None => (
                weight.codes.to_vec(),
                weight.shape.clone(),
                weight.scales.to_vec(),
                0,
            ),
        };
        let taps: usize = shape.iter().skip(2).product();
        let cols = shape.get(1).copied().unwrap_or(1);
        let row_len = weight.row_len();
        let code_channel = |i: usize| match transposed {
            Some(_) => (i / taps.max(1)) % cols,
            None => i / row_len.max(1),
        };
        let out_channel = |c: usize| match transposed {
            Some(_) => c % cols,
            None => c,
        };
        let (codes, scales): (Vec<i8>, Vec<f32>) = if self.per_tensor_weights && scales.len() > 1 {
            // One scale, the largest channel's: every code stays in range.
            let s = scales.iter().copied().fold(0f32, f32::max);
            let codes = codes
                .iter()
                .enumerate()
                .map(|(i, &q)| (q as f32 * (scales[code_channel(i)] / s)).round_ties_even() as i8)
                .collect();
            self.requantized.push(path.to_string());
            (codes, vec![s])
        } else {
            (codes, scales)
        };
        let per_channel = scales.len() > 1;
        let scale_dims: Vec<usize> = if per_channel {
            vec![scales.len()]
        } else {
            vec![]
        };
        let wq = self.init(
            &format!("{path}.weight_quantized"),
            &shape,
            DataType::Int8,
            codes.iter().map(|&c| c as u8).collect(),
        );
        let ws = self.init_f32(&format!("{path}.weight_scale"), &scale_dims, &scales);
        let wz = self.init(
            &format!("{path}.weight_zero_point"),
            &scale_dims,
            DataType::Int8,
            vec![0; scales.len()],
        );
        let w_axis = if per_channel {
            vec![attr_int("axis", axis)]
        } else {
            vec![]
        };
        let w = self.fresh(&format!("{path}.weight"));
        self.node("DequantizeLinear", path, &[&wq, &ws, &wz], &w, w_axis);

        // The bias: one scale per output channel (axis 0 of the bias).
        let scales: Vec<f32> = if per_channel {
            (0..o).map(|c| scales[out_channel(c)]).collect()
        } else {
            scales
        };
        let scale_dims: &[usize] = if per_channel { &[o] } else { &[] };
        let axis = if per_channel {
            vec![attr_int("axis", 0)]
        } else {
            vec![]
        };
        let bias_scales: Vec<f32> = scales.iter().map(|&s| input.scale * s).collect();
        if bias_float.len() != o || bias_int.len() != o {
            return Err(Error::state(
                format!("{path}: {} bias values for {o} channels", bias_float.len()),
                "report this as a bug",
            ));
        }
        let bias: Vec<i32> = (0..o)
            .map(|c| {
                let s = bias_scales[if per_channel { c } else { 0 }] as f64;
                let v = bias_int[c] as f64 + (bias_float[c] as f64 / s).round_ties_even();
                v.clamp(i32::MIN as f64, i32::MAX as f64) as i32
            })
            .collect();
        let bq = self.init(
            &format!("{path}.bias_quantized"),
            &[o],
            DataType::Int32,
            raw(&bias, i32::to_le_bytes),
        );
        let bs = self.init_f32(&format!("{path}.bias_scale"), scale_dims, &bias_scales);
        let b = self.fresh(&format!("{path}.bias"));
        self.node("DequantizeLinear", path, &[&bq, &bs], &b, axis);
        Ok((w, b))
    }

    /// Conv, Gemm (2-D input) or MatMul + Add of float `x`, `w`, `b`; returns the output.
    #[allow(clippy::too_many_arguments)]
    fn weighted(
        &mut self,
        path: &str,
        kind: WeightedKind,
        x: &str,
        w: &str,
        b: &str,
        rank: usize,
        layer: &LayerInfo,
    ) -> Result<String> {
        let out = self.fresh(&format!("{path}.linear_output"));
        match kind {
            WeightedKind::Conv { config: c, rank: r } => {
                let k = |v: usize| vec![v as i64; r];
                let attrs = vec![
                    attr_ints("strides", &k(c.stride)),
                    attr_ints("pads", &vec![c.padding as i64; 2 * r]),
                    attr_ints("dilations", &k(c.dilation)),
                    attr_int("group", c.groups as i64),
                ];
                self.node("Conv", path, &[x, w, b], &out, attrs);
            }
            WeightedKind::ConvTranspose { config: c, rank: r } => {
                let k = |v: usize| vec![v as i64; r];
                let attrs = vec![
                    attr_ints("strides", &k(c.stride)),
                    attr_ints("pads", &vec![c.padding as i64; 2 * r]),
                    attr_ints("dilations", &k(c.dilation)),
                    attr_ints("output_padding", &k(c.output_padding)),
                    attr_int("group", c.groups as i64),
                ];
                self.node("ConvTranspose", path, &[x, w, b], &out, attrs);
            }
            WeightedKind::Linear if rank == 2 => {
                self.node("Gemm", path, &[x, w, b], &out, vec![attr_int("transB", 1)]);
            }
            WeightedKind::Linear if rank > 2 => {
                let wt = self.fresh(&format!("{path}.weight_t"));
                self.node(
                    "Transpose",
                    path,
                    &[w],
                    &wt,
                    vec![attr_ints("perm", &[1, 0])],
                );
                let mm = self.fresh(&format!("{path}.matmul"));
                self.node("MatMul", path, &[x, &wt], &mm, vec![]);
                self.node("Add", path, &[&mm, b], &out, vec![]);
            }
            WeightedKind::Linear => {
                return Err(Error::tensor(
                    format!(
                        "cannot export {} ({}): a 1-D input to Linear",
                        layer.path, layer.kind
                    ),
                    "feed Linear a (batch, features) tensor",
                ))
            }
        }
        Ok(out)
    }

    /// A float op on `xs`; returns its output (`xs[0]` for the identity).
    fn float_op(
        &mut self,
        path: &str,
        op: &FloatOp,
        xs: &[String],
        out_dims: &[usize],
        layer: &LayerInfo,
    ) -> Result<String> {
        let ins: Vec<&str> = xs.iter().map(String::as_str).collect();
        let simple = |b: &mut Self, op_type: &str, attrs: Vec<AttributeProto>| {
            let out = b.fresh(&format!("{path}.{}", op_type.to_lowercase()));
            b.node(op_type, path, &ins, &out, attrs);
            out
        };
        Ok(match op {
            FloatOp::Identity => xs[0].clone(),
            FloatOp::Add => simple(self, "Add", vec![]),
            FloatOp::Mul => simple(self, "Mul", vec![]),
            FloatOp::AddRelu => {
                let sum = simple(self, "Add", vec![]);
                let out = self.fresh(&format!("{path}.relu"));
                self.node("Relu", path, &[&sum], &out, vec![]);
                out
            }
            FloatOp::Cat(dim) => simple(self, "Concat", vec![attr_int("axis", *dim as i64)]),
            FloatOp::Relu => simple(self, "Relu", vec![]),
            FloatOp::Sigmoid => simple(self, "Sigmoid", vec![]),
            FloatOp::Tanh => simple(self, "Tanh", vec![]),
            FloatOp::MaxPool2d { kernel, stride } => simple(
                self,
                "MaxPool",
                vec![
                    attr_ints("kernel_shape", &[*kernel as i64; 2]),
                    attr_ints("strides", &[*stride as i64; 2]),
                ],
            ),
            FloatOp::Flatten(1) => simple(self, "Flatten", vec![attr_int("axis", 1)]),
            FloatOp::Flatten(start) => {
                // Keep the dims before `start` (0 copies the input's dim), merge the rest.
                let mut shape = vec![0i64; *start];
                shape.push(-1);
                let s = self.init(
                    &format!("{path}.shape"),
                    &[shape.len()],
                    DataType::Int64,
                    raw(&shape, i64::to_le_bytes),
                );
                let out = self.fresh(&format!("{path}.reshape"));
                self.node("Reshape", path, &[&xs[0], &s], &out, vec![]);
                out
            }
            FloatOp::Relu6 => {
                let lo = self.scalar(path, "min", 0.0);
                let hi = self.scalar(path, "max", 6.0);
                let out = self.fresh(&format!("{path}.clip"));
                self.node("Clip", path, &[&xs[0], &lo, &hi], &out, vec![]);
                out
            }
            FloatOp::Hardsigmoid => simple(self, "HardSigmoid", hard_sigmoid_attrs()),
            FloatOp::Hardswish => {
                // HardSwish is opset 14; we write opset 13: x * HardSigmoid(x).
                let h = self.fresh(&format!("{path}.hardsigmoid"));
                self.node("HardSigmoid", path, &[&xs[0]], &h, hard_sigmoid_attrs());
                self.bin(path, "Mul", &xs[0], &h)
            }
            FloatOp::LeakyRelu(slope) => {
                simple(self, "LeakyRelu", vec![attr_float("alpha", *slope as f32)])
            }
            FloatOp::Elu(alpha) => simple(self, "Elu", vec![attr_float("alpha", *alpha as f32)]),
            FloatOp::AvgPool2d {
                kernel,
                stride,
                padding,
            } => simple(
                self,
                "AveragePool",
                vec![
                    attr_ints("kernel_shape", &kernel.map(|v| v as i64)),
                    attr_ints("strides", &stride.map(|v| v as i64)),
                    attr_ints(
                        "pads",
                        &[padding[0], padding[1], padding[0], padding[1]].map(|v| v as i64),
                    ),
                    attr_int("count_include_pad", 1),
                ],
            ),
            FloatOp::AdaptiveAvgPool2d { output: [1, 1], .. } => {
                simple(self, "GlobalAveragePool", vec![])
            }
            FloatOp::AdaptiveAvgPool2d { input, output }
                if input[0].is_multiple_of(output[0]) && input[1].is_multiple_of(output[1]) =>
            {
                let k = [(input[0] / output[0]) as i64, (input[1] / output[1]) as i64];
                simple(
                    self,
                    "AveragePool",
                    vec![attr_ints("kernel_shape", &k), attr_ints("strides", &k)],
                )
            }
            FloatOp::AdaptiveAvgPool2d { input, output } => {
                return Err(Error::tensor(
                    format!(
                        "cannot export {} ({}): adaptive pooling of {input:?} to {output:?} has \
                         windows of different sizes, which ONNX's AveragePool cannot express",
                        layer.path, layer.kind
                    ),
                    "use an output size that divides the input size (or 1x1, a global \
                     average pool)",
                ))
            }
            FloatOp::UpsampleNearest(scale) => {
                // Resize (opset 13) with PyTorch's nearest rule: src = floor(dst / scale).
                let scales = self.init_f32(
                    &format!("{path}.scales"),
                    &[4],
                    &[1.0, 1.0, scale[0] as f32, scale[1] as f32],
                );
                let out = self.fresh(&format!("{path}.resize"));
                self.node(
                    "Resize",
                    path,
                    &[&xs[0], "", &scales],
                    &out,
                    vec![
                        attr_string("mode", "nearest"),
                        attr_string("coordinate_transformation_mode", "asymmetric"),
                        attr_string("nearest_mode", "floor"),
                    ],
                );
                out
            }
            FloatOp::Silu => {
                let sig = self.fresh(&format!("{path}.sigmoid"));
                self.node("Sigmoid", path, &[&xs[0]], &sig, vec![]);
                self.bin(path, "Mul", &xs[0], &sig)
            }
            FloatOp::Gelu { tanh: false } => {
                // 0.5 * x * (1 + erf(x / sqrt(2)))
                let sqrt2 = self.scalar(path, "sqrt2", std::f32::consts::SQRT_2);
                let t = self.bin(path, "Div", &xs[0], &sqrt2);
                let e = self.fresh(&format!("{path}.erf"));
                self.node("Erf", path, &[&t], &e, vec![]);
                self.gelu_tail(path, &xs[0], &e)
            }
            FloatOp::Gelu { tanh: true } => {
                // 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
                let x = &xs[0];
                let x2 = self.bin(path, "Mul", x, x);
                let x3 = self.bin(path, "Mul", &x2, x);
                let c = self.scalar(path, "coeff", 0.044715);
                let cx3 = self.bin(path, "Mul", &x3, &c);
                let inner = self.bin(path, "Add", x, &cx3);
                let k = self.scalar(path, "sqrt_2_over_pi", (2.0 / std::f32::consts::PI).sqrt());
                let arg = self.bin(path, "Mul", &inner, &k);
                let t = self.fresh(&format!("{path}.tanh"));
                self.node("Tanh", path, &[&arg], &t, vec![]);
                self.gelu_tail(path, x, &t)
            }
            FloatOp::RmsNorm { weight, eps } => {
                // x / sqrt(mean(x^2, -1) + eps) * weight
                let w = self.norm_param(path, "weight", weight, out_dims, layer)?;
                let x = &xs[0];
                let sq = self.bin(path, "Mul", x, x);
                let ms = self.reduce_mean(path, &sq);
                let std = self.add_eps_sqrt(path, &ms, *eps);
                let n = self.bin(path, "Div", x, &std);
                self.bin(path, "Mul", &n, &w)
            }
            FloatOp::LayerNorm { weight, bias, eps } => {
                // LayerNormalization is opset 17; we write opset 13, so decompose it:
                // (x - mean) / sqrt(mean((x - mean)^2) + eps) * weight + bias
                let w = self.norm_param(path, "weight", weight, out_dims, layer)?;
                let b = self.norm_param(path, "bias", bias, out_dims, layer)?;
                let x = &xs[0];
                let mean = self.reduce_mean(path, x);
                let d = self.bin(path, "Sub", x, &mean);
                let d2 = self.bin(path, "Mul", &d, &d);
                let var = self.reduce_mean(path, &d2);
                let std = self.add_eps_sqrt(path, &var, *eps);
                let n = self.bin(path, "Div", &d, &std);
                let scaled = self.bin(path, "Mul", &n, &w);
                self.bin(path, "Add", &scaled, &b)
            }
            FloatOp::BatchNorm {
                weight,
                bias,
                mean,
                var,
                eps,
                relu,
            } => {
                let c = out_dims.get(1).copied().unwrap_or(0);
                if [weight, bias, mean, var].iter().any(|v| v.len() != c) {
                    return Err(Error::state(
                        format!(
                            "cannot export {} ({}): its parameters could not be read",
                            layer.path, layer.kind
                        ),
                        "report this as a bug",
                    ));
                }
                let inits: Vec<String> = [("weight", weight), ("bias", bias)]
                    .into_iter()
                    .chain([("running_mean", mean), ("running_var", var)])
                    .map(|(n, v)| self.init_f32(&format!("{path}.{n}"), &[c], v))
                    .collect();
                let out = self.fresh(&format!("{path}.batchnorm"));
                self.node(
                    "BatchNormalization",
                    path,
                    &[&xs[0], &inits[0], &inits[1], &inits[2], &inits[3]],
                    &out,
                    vec![attr_float("epsilon", *eps as f32)],
                );
                if *relu {
                    let r = self.fresh(&format!("{path}.relu"));
                    self.node("Relu", path, &[&out], &r, vec![]);
                    r
                } else {
                    out
                }
            }
        })
    }

    /// A binary node `op_type(a, b)` of layer `path`; returns its output.
    fn bin(&mut self, path: &str, op_type: &str, a: &str, b: &str) -> String {
        let out = self.fresh(&format!("{path}.{}", op_type.to_lowercase()));
        self.node(op_type, path, &[a, b], &out, vec![]);
        out
    }

    /// A scalar f32 initializer.
    fn scalar(&mut self, path: &str, name: &str, v: f32) -> String {
        self.init_f32(&format!("{path}.{name}"), &[], &[v])
    }

    /// `ReduceMean` over the last axis, keeping it (opset 13: axes as an attribute).
    fn reduce_mean(&mut self, path: &str, x: &str) -> String {
        let out = self.fresh(&format!("{path}.reducemean"));
        let attrs = vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)];
        self.node("ReduceMean", path, &[x], &out, attrs);
        out
    }

    /// `sqrt(v + eps)`.
    fn add_eps_sqrt(&mut self, path: &str, v: &str, eps: f64) -> String {
        let e = self.scalar(path, "eps", eps as f32);
        let a = self.bin(path, "Add", v, &e);
        let out = self.fresh(&format!("{path}.sqrt"));
        self.node("Sqrt", path, &[&a], &out, vec![]);
        out
    }

    /// `0.5 * x * (1 + t)`, the end of both GELU formulas.
    fn gelu_tail(&mut self, path: &str, x: &str, t: &str) -> String {
        let one = self.scalar(path, "one", 1.0);
        let a = self.bin(path, "Add", t, &one);
        let m = self.bin(path, "Mul", x, &a);
        let half = self.scalar(path, "half", 0.5);
        self.bin(path, "Mul", &m, &half)
    }

    /// A norm layer's per-feature parameter (one value per element of the last dim).
    fn norm_param(
        &mut self,
        path: &str,
        name: &str,
        v: &[f32],
        out_dims: &[usize],
        layer: &LayerInfo,
    ) -> Result<String> {
        let d = out_dims.last().copied().unwrap_or(0);
        if v.len() != d {
            return Err(Error::state(
                format!(
                    "cannot export {} ({}): its parameter `{name}` could not be read",
                    layer.path, layer.kind
                ),
                "report this as a bug",
            ));
        }
        Ok(self.init_f32(&format!("{path}.{name}"), &[d], v))
    }

    /// The graph with `output` (a tensor the forward returned) as its output.
    pub fn finish(
        mut self,
        input: ValueInfoProto,
        output: TensorId,
        output_dims: &[usize],
        dynamic_batch: bool,
    ) -> Result<GraphProto> {
        let (name, dt) = match self.values.get(&output) {
            Some(Value::Float(n)) => (n.clone(), DataType::Float),
            Some(Value::Quant { name, .. }) => (name.clone(), DataType::Uint8),
            None => {
                return Err(Error::tensor(
                    "cannot export the model: its output was computed by an operation the \
                     exporter did not see (a candle op after the last candle-qat layer)",
                    "return the output of a candle-qat layer (a DeQuantStub for float logits)",
                ))
            }
        };
        self.node("Identity", "output", &[&name], "output", vec![]);
        Ok(GraphProto {
            node: self.nodes,
            name: Some("candle-qat".into()),
            initializer: self.initializers,
            input: vec![input],
            output: vec![value_info("output", dt, output_dims, dynamic_batch)],
            ..Default::default()
        })
    }
}

/// PyTorch's hardsigmoid, min(max(x + 3, 0), 6) / 6, as ONNX's HardSigmoid
/// (max(0, min(1, alpha * x + beta))).
fn hard_sigmoid_attrs() -> Vec<AttributeProto> {
    vec![attr_float("alpha", 1.0 / 6.0), attr_float("beta", 0.5)]
}
