"""PyTorch 2.15's side of benches/qat_step.rs: MnistNet at batch 64, one training step
(forward, cross-entropy, backward, SGD) in float and fused + prepared for QAT with the x86
preset; median of 30 steps after 5 warm-up steps.

    python benches/reference/pytorch_qat_step.py THREADS
"""
import sys, time, statistics, torch, torch.nn as nn
import torch.ao.quantization as tq
threads = int(sys.argv[1]); torch.set_num_threads(threads)
class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.quant = tq.QuantStub()
        s.conv1 = nn.Conv2d(1,16,3,padding=1); s.bn1 = nn.BatchNorm2d(16); s.relu1 = nn.ReLU()
        s.conv2 = nn.Conv2d(16,32,3,stride=2,padding=1); s.bn2 = nn.BatchNorm2d(32); s.relu2 = nn.ReLU()
        s.conv3 = nn.Conv2d(32,64,3,stride=2,padding=1); s.bn3 = nn.BatchNorm2d(64); s.relu3 = nn.ReLU()
        s.fc1 = nn.Linear(3136,128); s.relu4 = nn.ReLU(); s.fc2 = nn.Linear(128,10)
        s.dequant = tq.DeQuantStub()
    def forward(s, x):
        x = s.quant(x)
        x = s.relu1(s.bn1(s.conv1(x))); x = s.relu2(s.bn2(s.conv2(x))); x = s.relu3(s.bn3(s.conv3(x)))
        x = s.relu4(s.fc1(torch.flatten(x, 1)))
        return s.dequant(s.fc2(x))
def bench(m):
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x = torch.randn(64,1,28,28); y = torch.randint(0,10,(64,))
    def step():
        opt.zero_grad(); nn.functional.cross_entropy(m(x), y).backward(); opt.step()
    for _ in range(5): step()
    ts = []
    for _ in range(30):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3
f = Net().train()
q = Net().train()
q.qconfig = tq.get_default_qat_qconfig("x86")
q = tq.fuse_modules_qat(q, [["conv1","bn1","relu1"],["conv2","bn2","relu2"],["conv3","bn3","relu3"],["fc1","relu4"]])
q = tq.prepare_qat(q)
print(f"pytorch threads={threads} float {bench(f):.2f} ms qat {bench(q):.2f} ms")
