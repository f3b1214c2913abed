"""Writes tests/data/eager_conv_transpose/*.json: ConvTranspose1d / ConvTranspose2d under
PyTorch 2.15, on QuantStub -> ConvTranspose -> DeQuantStub, for the qnnpack and x86 presets
(get_default_qat_qconfig(preset, 0)), over shapes with stride 2 and 3, padding,
output_padding, dilation and groups > 1.

What PyTorch's eager flow does with a ConvTranspose (torch/ao/quantization):
  - quantization_mappings.py: no QAT module for ConvTranspose (DEFAULT_QAT_MODULE_MAPPINGS has
    none); the static mapping sends nn.ConvTranspose1d/2d to nnq.ConvTranspose1d/2d.
  - prepare_qat therefore leaves the float ConvTranspose in place and only attaches the
    activation fake-quant to its output: its weight is NOT fake-quantized during QAT.
  - convert (nnq._ConvTransposeNd.from_float) builds a fresh qconfig.weight() observer, runs it
    once on the final weight and quantizes with it. A per-channel weight qconfig (x86/fbgemm's
    default, ch_axis=0) fails there: "Per Channel Quantization is currently disabled for
    transposed conv". So the x86 cases use a per-tensor weight qconfig
    (default_weight_fake_quant), as PyTorch's own FX default mapping does for ConvTranspose.
  - fuser_method_mappings.py: (ConvTranspose, BatchNorm) -> fuse_convtranspose_bn, eval only
    (QAT raises), giving a plain ConvTranspose with folded weights
    (fuse_conv_bn_weights(transpose=True)), which fails for groups > 1 (pytorch#180995).

Each case (tensors as in tests/golden/FORMAT.md):
  module, args           ConvTranspose1d/2d and its constructor arguments; weight, bias
  preset                 quantized engine; calib (train-mode batches under no_grad); x, grad_y
  eager                  PyTorch's own eager pipeline (prepare_qat, calib, a train forward and
                         backward, eval, disable_observer, convert):
                           qat_y, grad_x, grad_w, grad_b, act_* (output fake-quant), in_* (QuantStub)
                           int8_codes, int8_scale, int8_zero_point: the converted model's
                           output codes on x; weight_scale: the converted weight's scale
                           int8_codes_clamped: the same with the input codes and the output
                           clamped to their trained ranges (FORMAT.md's clamped rule)
                           int8_ref_codes_clamped: the layer's math in float on those input
                           codes, rounded and clamped; int8_ref_max_diff: how far PyTorch's
                           int8 module is from it (x86 ConvTranspose1d: tens of codes)
  weight_fq              the same layer with its weight fake-quantized in QAT, where PT2E's
                         quantizers place it (per tensor for qnnpack; per channel along axis 1 for
                         x86, FakeQuantize(ch_axis=1)); the forward/backward built from
                         PyTorch's fake-quant modules and F.conv_transpose*d:
                           qat_y, grad_x, grad_w, act_*, w_scales; int8_codes: PyTorch's
                           nnq.ConvTranspose*d.from_float with these output qparams (per-tensor
                           weights only; null with int8_error for per-channel)
  fusion                 a BatchNorm after the layer in eval: bn_* parameters, fused_weight /
                         fused_bias from torch.ao.quantization.fuse_modules (or fuse_error when
                         PyTorch's fusion fails, groups > 1), ref_y = bn(convT(x)) unfused

Run with a Python that has torch 2.15: python tools/gen_eager_conv_transpose.py
CI never runs this; the JSON files are committed.
"""

import json
import os
import struct
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.ao.nn.quantized as nnq
from torch.ao.quantization import (
    DeQuantStub,
    FakeQuantize,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QuantStub,
    convert,
    default_weight_fake_quant,
    fuse_modules,
    get_default_qat_qconfig,
    prepare_qat,
)

warnings.filterwarnings("ignore")

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "eager_conv_transpose")


def f32(v):
    v = float(v)
    want = struct.unpack("f", struct.pack("f", v))[0]
    for digits in range(1, 18):
        cand = "%.*g" % (digits, v)
        if struct.unpack("f", struct.pack("f", float(cand)))[0] == want:
            return float(cand)
    return float(repr(want))


def tensor(t):
    t = t.detach().contiguous()
    if t.dtype == torch.float32:
        return {"shape": list(t.shape), "dtype": "f32", "data": [f32(v) for v in t.flatten().tolist()]}
    if t.dtype == torch.uint8:
        return {"shape": list(t.shape), "dtype": "u8", "data": t.flatten().tolist()}
    raise ValueError(t.dtype)


# (rank, in, out, k, stride, padding, output_padding, dilation, groups, input spatial)
SHAPES = [
    (2, 4, 6, 3, 2, 1, 1, 1, 1, (5, 5)),
    (2, 4, 4, 2, 2, 0, 0, 1, 2, (4, 3)),
    (2, 6, 3, 3, 1, 2, 1, 2, 3, (4, 5)),
    (1, 3, 4, 4, 2, 1, 0, 1, 1, (7,)),
    (1, 4, 6, 3, 3, 1, 2, 1, 2, (6,)),
]


def make_layer(rank, cin, cout, k, s, p, op, d, g):
    cls = nn.ConvTranspose1d if rank == 1 else nn.ConvTranspose2d
    return cls(cin, cout, k, stride=s, padding=p, output_padding=op, groups=g, bias=True, dilation=d)


class Net(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.quant = QuantStub()
        self.conv = conv
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.conv(self.quant(x)))


def qconfig(preset):
    qc = get_default_qat_qconfig(preset, 0)
    # Per-channel transposed-conv weights do not convert in PyTorch; per tensor as FX does.
    return QConfig(activation=qc.activation, weight=default_weight_fake_quant)


def fq_info(fq):
    return {
        "scale": f32(fq.scale.item()),
        "zero_point": int(fq.zero_point.item()),
        "quant_min": int(fq.quant_min),
        "quant_max": int(fq.quant_max),
    }


def eager(conv0, preset, calib, x0, grad_y):
    torch.backends.quantized.engine = preset
    conv = make_layer(*conv0["shape"])
    conv.load_state_dict(conv0["state"])
    m = Net(conv)
    m.train()
    m.qconfig = qconfig(preset)
    prepare_qat(m, inplace=True)
    with torch.no_grad():
        for c in calib:
            m(c)
    x = x0.clone().requires_grad_(True)
    y = m(x)
    (y * grad_y).sum().backward()
    out = {
        "qat_y": tensor(y),
        "grad_x": tensor(x.grad),
        "grad_w": tensor(m.conv.weight.grad),
        "grad_b": tensor(m.conv.bias.grad),
        "act": fq_info(m.conv.activation_post_process),
        "input": fq_info(m.quant.activation_post_process),
    }
    m.eval()
    m.apply(torch.ao.quantization.disable_observer)
    q = convert(m, inplace=False)
    with torch.no_grad():
        yq = q.conv(q.quant(x0))
    out["int8_codes"] = tensor(yq.int_repr())
    out["int8_scale"] = f32(yq.q_scale())
    out["int8_zero_point"] = int(yq.q_zero_point())
    out["weight_scale"] = f32(q.conv.weight().q_scale())
    # The clamped rule (tests/golden/FORMAT.md): every activation clamped to the range its
    # fake-quant trained with (x86: 0..127), the input codes before the layer and its output.
    in_fq, out_fq = m.quant.activation_post_process, m.conv.activation_post_process
    xq = q.quant(x0)
    xc = xq.int_repr().clamp(in_fq.quant_min, in_fq.quant_max)
    xq_c = torch._make_per_tensor_quantized_tensor(xc, xq.q_scale(), xq.q_zero_point())
    with torch.no_grad():
        yq_c = q.conv(xq_c).int_repr().clamp(out_fq.quant_min, out_fq.quant_max)
        # The same layer's arithmetic in float on the dequantized codes: what an exact integer
        # kernel must give, but for ties at .5 decided by the f32 rounding of the reference.
        rank = conv0["shape"][0]
        op = F.conv_transpose1d if rank == 1 else F.conv_transpose2d
        c = q.conv
        ref = op(xq_c.dequantize(), c.weight().dequantize(), c.bias(), c.stride, c.padding, c.output_padding, c.groups, c.dilation)
        ref_c = (torch.round(ref / yq.q_scale()) + yq.q_zero_point()).clamp(out_fq.quant_min, out_fq.quant_max)
    out["int8_codes_clamped"] = tensor(yq_c)
    out["int8_ref_codes_clamped"] = tensor(ref_c.to(torch.uint8))
    out["int8_ref_max_diff"] = int((yq_c.float() - ref_c).abs().max())
    return out


def weight_fq_pipeline(conv0, preset, calib, x0, grad_y):
    torch.backends.quantized.engine = preset
    rank = conv0["shape"][0]
    conv = make_layer(*conv0["shape"])
    conv.load_state_dict(conv0["state"])
    conv.train()
    qc = get_default_qat_qconfig(preset, 0)
    in_fq = qc.activation()
    out_fq = qc.activation()
    if preset == "qnnpack":
        w_fq = default_weight_fake_quant()
    else:
        w_fq = FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            reduce_range=False,
            ch_axis=1,
        )()
    op = F.conv_transpose1d if rank == 1 else F.conv_transpose2d

    def fwd(x):
        w = w_fq(conv.weight)
        y = op(in_fq(x), w, conv.bias, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation)
        return out_fq(y)

    with torch.no_grad():
        for c in calib:
            fwd(c)
    x = x0.clone().requires_grad_(True)
    y = fwd(x)
    (y * grad_y).sum().backward()
    out = {
        "qat_y": tensor(y),
        "grad_x": tensor(x.grad),
        "grad_w": tensor(conv.weight.grad),
        "act": fq_info(out_fq),
        "input": fq_info(in_fq),
        "w_scales": [f32(v) for v in w_fq.scale.flatten().tolist()],
    }
    # PyTorch's int8 module with these qparams: a float layer carrying the output fake-quant.
    f = make_layer(*conv0["shape"])
    f.load_state_dict(conv0["state"])
    f.eval()
    out_fq.disable_observer()
    f.qconfig = QConfig(activation=qc.activation, weight=default_weight_fake_quant)
    f.activation_post_process = out_fq
    cls = nnq.ConvTranspose1d if rank == 1 else nnq.ConvTranspose2d
    if preset == "qnnpack":
        q = cls.from_float(f)
        xq = torch.quantize_per_tensor(x0, in_fq.scale.item(), int(in_fq.zero_point.item()), torch.quint8)
        with torch.no_grad():
            yq = q(xq)
        out["int8_codes"] = tensor(yq.int_repr())
    else:
        f.qconfig = QConfig(activation=qc.activation, weight=lambda: w_fq)
        try:
            cls.from_float(f)
            out["int8_codes"] = None
            out["int8_error"] = "converted (unexpected)"
        except Exception as e:  # noqa: BLE001 - recorded as what PyTorch does
            out["int8_codes"] = None
            out["int8_error"] = str(e).splitlines()[0]
    return out


def fusion(conv0, x0, seed):
    torch.manual_seed(seed)
    rank, cin, cout = conv0["shape"][:3]
    conv = make_layer(*conv0["shape"])
    conv.load_state_dict(conv0["state"])
    bn = (nn.BatchNorm1d if rank == 1 else nn.BatchNorm2d)(cout)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(cout))
        bn.bias.copy_(torch.randn(cout))
        bn.running_mean.copy_(torch.randn(cout) * 0.3)
        bn.running_var.copy_(torch.rand(cout) + 0.5)
    seq = nn.Sequential(conv, bn).eval()
    with torch.no_grad():
        ref = seq(x0)
    out = {
        "bn_weight": tensor(bn.weight),
        "bn_bias": tensor(bn.bias),
        "bn_running_mean": tensor(bn.running_mean),
        "bn_running_var": tensor(bn.running_var),
        "bn_eps": bn.eps,
        "ref_y": tensor(ref),
    }
    try:
        fused = fuse_modules(seq, [["0", "1"]], inplace=False)
        # groups > 1: the fold may "succeed" with a wrongly broadcast weight that fails only
        # when run; both count as PyTorch's fusion failing.
        with torch.no_grad():
            fused_y = fused(x0)
        out["fused_weight"] = tensor(fused[0].weight)
        out["fused_bias"] = tensor(fused[0].bias)
        out["fused_y"] = tensor(fused_y)
    except Exception as e:  # noqa: BLE001 - pytorch#180995, recorded
        out["fuse_error"] = str(e).splitlines()[0]
    return out


def case(idx, shape, preset, seed):
    torch.manual_seed(seed)
    rank, cin, cout, k, s, p, op, d, g, spatial = shape
    conv = make_layer(rank, cin, cout, k, s, p, op, d, g)
    conv0 = {"shape": (rank, cin, cout, k, s, p, op, d, g), "state": {n: t.clone() for n, t in conv.state_dict().items()}}
    calib = [torch.randn(2, cin, *spatial) * 1.5 for _ in range(3)]
    x = torch.randn(2, cin, *spatial) * 1.5
    y_shape = conv(x).shape
    grad_y = torch.randn(y_shape)
    name = "ConvTranspose%dd" % rank
    short = f"{name.lower()}-s{s}p{p}o{op}d{d}g{g}-{preset}"
    out = {
        "kind": "eager_conv_transpose",
        "name": f"eager_conv_transpose-{idx:03d}-{short}",
        "torch_version": torch.__version__,
        "module": name,
        "args": {
            "in_channels": cin,
            "out_channels": cout,
            "kernel_size": k,
            "stride": s,
            "padding": p,
            "output_padding": op,
            "dilation": d,
            "groups": g,
        },
        "preset": preset,
        "weight": tensor(conv.weight),
        "bias": tensor(conv.bias),
        "calib": [tensor(c) for c in calib],
        "x": tensor(x),
        "grad_y": tensor(grad_y),
        "eager": eager(conv0, preset, calib, x, grad_y),
        "weight_fq": weight_fq_pipeline(conv0, preset, calib, x, grad_y),
        "fusion": fusion(conv0, x, seed + 1),
    }
    with open(os.path.join(OUT, out["name"] + ".json"), "w") as f:
        json.dump(out, f)
    print(out["name"], out["eager"]["int8_ref_max_diff"], out["weight_fq"].get("int8_error", ""), out["fusion"].get("fuse_error", ""))


def main():
    os.makedirs(OUT, exist_ok=True)
    idx = 0
    for shape in SHAPES:
        for preset in ["qnnpack", "x86"]:
            case(idx, shape, preset, 3000 + idx)
            idx += 1


if __name__ == "__main__":
    main()
