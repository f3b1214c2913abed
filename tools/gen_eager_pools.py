"""Writes tests/data/eager_pools/*.json: PyTorch 2.15's eager QAT pipeline on
QuantStub -> pool -> DeQuantStub for AvgPool2d, AdaptiveAvgPool2d and Upsample (nearest), on
the fbgemm and qnnpack presets (get_default_qat_qconfig(preset, 0); quantized engine =
preset, so qnnpack's own average pooling runs where PyTorch hands it over).

Each case (tensors as in tests/golden/FORMAT.md):
  module, args          the layer and its constructor arguments (kernel/stride/padding,
                        output size, scale factor)
  preset, calib, x, grad_y
  expected.qat_y        the train-mode forward on x after calibration (PyTorch's eager QAT
                        leaves a pool's output unrounded)
  expected.grad_x       its input gradient for grad_y
  expected.in_scale / in_zero_point   QuantStub's fake-quant after that forward
  expected.int8_codes   after convert() with observers frozen, the pool's output codes on x,
                        its input codes clamped to the stub's trained range (FORMAT.md's
                        clamped rule); they keep the input's qparams

Run with a Python that has torch 2.15: python tools/gen_eager_pools.py (CI never does).
"""

import json
import os
import struct

import torch
import torch.nn as nn
from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qat_qconfig, prepare_qat

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "eager_pools")


def f32(v):
    v = struct.unpack("f", struct.pack("f", float(v)))[0]
    for digits in range(1, 18):
        cand = float("%.*g" % (digits, v))
        if struct.unpack("f", struct.pack("f", cand))[0] == v:
            return cand
    return v


def tensor(t):
    t = t.detach().contiguous()
    if t.dtype == torch.float32:
        return {"shape": list(t.shape), "dtype": "f32", "data": [f32(v) for v in t.flatten().tolist()]}
    if t.dtype == torch.uint8:
        return {"shape": list(t.shape), "dtype": "u8", "data": t.flatten().tolist()}
    raise ValueError(t.dtype)


class Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.quant = QuantStub()
        self.layer = layer
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.layer(self.quant(x)))


CASES = [
    ("AvgPool2d", {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}, lambda: nn.AvgPool2d(2), (2, 4, 8, 8)),
    ("AvgPool2d", {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]}, lambda: nn.AvgPool2d(3, 2, 1), (2, 4, 9, 7)),
    ("AdaptiveAvgPool2d", {"output": [1, 1]}, lambda: nn.AdaptiveAvgPool2d(1), (3, 8, 12, 12)),
    ("AdaptiveAvgPool2d", {"output": [2, 3]}, lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 4, 8, 9)),
    ("AdaptiveAvgPool2d", {"output": [3, 2]}, lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 4, 7, 5)),
    ("Upsample", {"scale": [2, 3]}, lambda: nn.Upsample(scale_factor=(2, 3), mode="nearest"), (2, 3, 4, 5)),
]


def case(idx, name, args, make, shape, preset, seed):
    torch.manual_seed(seed)
    torch.backends.quantized.engine = preset
    m = Net(make())
    m.train()
    m.qconfig = get_default_qat_qconfig(preset, 0)
    prepare_qat(m, inplace=True)
    calib = [torch.randn(*shape) * 2 for _ in range(2)]
    with torch.no_grad():
        for c in calib:
            m(c)
    x = (torch.randn(*shape) * 2).requires_grad_(True)
    y = m(x)
    grad_y = torch.randn_like(y)
    (y * grad_y).sum().backward()
    in_fq = m.quant.activation_post_process
    expected = {
        "qat_y": tensor(y),
        "grad_x": tensor(x.grad),
        "in_scale": f32(in_fq.scale.item()),
        "in_zero_point": int(in_fq.zero_point.item()),
    }
    m.eval()
    m.apply(torch.ao.quantization.disable_observer)
    q = convert(m, inplace=False)
    with torch.no_grad():
        xq = q.quant(x.detach())
        # The clamped rule (tests/golden/FORMAT.md, model_e2e): codes kept in the range the
        # stub's fake-quant trained with (fbgemm: 0..127); PyTorch clamps only to 0..255.
        lo, hi = in_fq.quant_min, in_fq.quant_max
        xq = torch._make_per_tensor_quantized_tensor(
            xq.int_repr().clamp(lo, hi), xq.q_scale(), xq.q_zero_point()
        )
        # Channels-last codes, as a quantized conv hands them on (PyTorch's NHWC kernels).
        yq = q.layer(xq.contiguous(memory_format=torch.channels_last))
    assert yq.q_scale() == xq.q_scale() and yq.q_zero_point() == xq.q_zero_point()
    expected["int8_codes"] = tensor(yq.int_repr().contiguous())
    out = {
        "kind": "eager_pool",
        "name": f"eager_pool-{idx:03d}-{name.lower()}-{preset}",
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
    for name, args, make, shape in CASES:
        for preset in ["fbgemm", "qnnpack"]:
            case(idx, name, args, make, shape, preset, 2000 + idx)
            idx += 1


if __name__ == "__main__":
    main()
