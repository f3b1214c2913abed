"""Writes tests/data/eager_activations/*.json: PyTorch 2.15's eager QAT pipeline on
QuantStub -> activation -> DeQuantStub for ReLU6, Hardswish, Hardsigmoid, LeakyReLU and ELU,
on the fbgemm and qnnpack presets (get_default_qat_qconfig(preset, 0)).

Each case (tensors as in tests/golden/FORMAT.md: {"shape", "dtype", "data"}, f32 written as the
shortest decimal that round-trips):
  module, args            the activation and its constructor arguments
  preset                  qconfig preset = quantized engine
  calib                   batches run in train mode under no_grad (observers update)
  x, grad_y               a train-mode forward and backward after calibration
  expected.qat_y          that forward's output (fake-quantized)
  expected.grad_x         d(sum(qat_y * grad_y))/dx through QuantStub's fake-quant
  expected.act_scale / act_zero_point / act_quant_min / act_quant_max
                          the activation's output fake-quant after that forward
  expected.in_scale / in_zero_point
                          QuantStub's fake-quant after that forward
  expected.int8_codes     after eval() and convert(), the converted activation's output
                          codes on x (PyTorch's int8 module), and int8_scale/int8_zero_point
                          the qparams they carry

Run with a Python that has torch 2.15: python tools/gen_eager_activations.py
CI never runs this; the JSON files are committed.
"""

import json
import os
import struct

import torch
import torch.nn as nn
from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qat_qconfig, prepare_qat

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "eager_activations")


def f32(v):
    v = float(v)
    s = repr(struct.unpack("f", struct.pack("f", v))[0])
    for digits in range(1, 18):
        cand = "%.*g" % (digits, v)
        if struct.unpack("f", struct.pack("f", float(cand)))[0] == struct.unpack("f", struct.pack("f", v))[0]:
            return float(cand)
    return float(s)


def tensor(t):
    t = t.detach().contiguous()
    if t.dtype == torch.float32:
        return {"shape": list(t.shape), "dtype": "f32", "data": [f32(v) for v in t.flatten().tolist()]}
    if t.dtype == torch.uint8:
        return {"shape": list(t.shape), "dtype": "u8", "data": t.flatten().tolist()}
    raise ValueError(t.dtype)


class Net(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.quant = QuantStub()
        self.act = act
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.act(self.quant(x)))


MODULES = [
    ("ReLU6", {}, lambda: nn.ReLU6(), 4.0),
    ("Hardswish", {}, lambda: nn.Hardswish(), 3.0),
    ("Hardsigmoid", {}, lambda: nn.Hardsigmoid(), 3.0),
    ("LeakyReLU", {"negative_slope": 0.2}, lambda: nn.LeakyReLU(0.2), 2.0),
    ("ELU", {"alpha": 0.7}, lambda: nn.ELU(0.7), 2.0),
]


def case(idx, name, args, make, spread, preset, seed):
    torch.manual_seed(seed)
    torch.backends.quantized.engine = preset
    m = Net(make())
    m.train()
    m.qconfig = get_default_qat_qconfig(preset, 0)
    prepare_qat(m, inplace=True)
    calib = [torch.randn(2, 3, 4, 5) * spread for _ in range(3)]
    with torch.no_grad():
        for c in calib:
            m(c)
    x = (torch.randn(2, 3, 4, 5) * spread).requires_grad_(True)
    grad_y = torch.randn(2, 3, 4, 5)
    y = m(x)
    (y * grad_y).sum().backward()
    act_fq = m.act.activation_post_process
    in_fq = m.quant.activation_post_process
    a_s, a_z = act_fq.calculate_qparams()
    i_s, i_z = in_fq.calculate_qparams()
    expected = {
        "qat_y": tensor(y),
        "grad_x": tensor(x.grad),
        "act_scale": f32(act_fq.scale.item()),
        "act_zero_point": int(act_fq.zero_point.item()),
        "act_quant_min": int(act_fq.quant_min),
        "act_quant_max": int(act_fq.quant_max),
        "in_scale": f32(in_fq.scale.item()),
        "in_zero_point": int(in_fq.zero_point.item()),
    }
    m.eval()
    # Freeze the observers so that the converted model uses what the QAT forward above used.
    m.apply(torch.ao.quantization.disable_observer)
    q = convert(m, inplace=False)
    with torch.no_grad():
        yq = q.act(q.quant(x.detach()))
    expected["int8_codes"] = tensor(yq.int_repr())
    expected["int8_scale"] = f32(yq.q_scale())
    expected["int8_zero_point"] = int(yq.q_zero_point())
    short = f"{name.lower()}-{preset}"
    out = {
        "kind": "eager_activation",
        "name": f"eager_activation-{idx:03d}-{short}",
        "torch_version": torch.__version__,
        "module": name,
        "args": args,
        "preset": preset,
        "calib": [tensor(c) for c in calib],
        "x": tensor(x),
        "grad_y": tensor(grad_y),
        "expected": expected,
    }
    with open(os.path.join(OUT, out["name"] + ".json"), "w") as f:
        json.dump(out, f)


def main():
    os.makedirs(OUT, exist_ok=True)
    idx = 0
    for name, args, make, spread in MODULES:
        for preset in ["fbgemm", "qnnpack"]:
            case(idx, name, args, make, spread, preset, 1000 + idx)
            idx += 1


if __name__ == "__main__":
    main()
