"""onnxruntime's side of benches/int8_inference.rs: the exported int8 (QDQ) MnistNet and
residual net, x86 preset, run by onnxruntime 1.32 on the CPU at batch 1 and 64, 1 and 2
threads; median of 41 timed runs after 10 warm-up runs, per cell.

    cargo test --test onnx_export        # with QAT_ONNX_DIR=$PWD/target/onnx-check
    target/onnx-venv/bin/python benches/reference/onnxruntime_int8.py target/onnx-check \
        [--threads 1,2] [--batch 1,64] [--models mnist_net_x86,residual_x86]

Sessions: all graph optimisations (ORT_ENABLE_ALL: QDQ groups fused into QLinearConv /
QGemm-class integer kernels, MLAS dispatching on the CPU's features),
`intra_op_num_threads` = the thread count, `inter_op_num_threads` = 1, sequential
execution. Like tests/onnx/check_onnx.py, the WeightBiasQuantization pass is disabled: the
residual net keeps fc1 in float (so does candle-qat's converted model), and that pass would
quantize it. The input is the first `batch` images of inputs.npy, repeated as needed.
Each line printed: model, threads, batch, median / min / max in microseconds.
"""

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort

ort.set_default_logger_severity(3)

WARMUP = 10
RUNS = 41


def session(path, threads):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(
        path,
        opts,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["WeightBiasQuantization"],
    )


def time_cell(sess, x):
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(WARMUP):
        sess.run(None, feed)
    ts = []
    for _ in range(RUNS):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6, min(ts) * 1e6, max(ts) * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir", nargs="?", default=os.environ.get("QAT_ONNX_DIR"))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batch", default="1,64")
    p.add_argument("--models", default="mnist_net_x86,residual_x86")
    a = p.parse_args()
    if not a.dir:
        p.error("give the directory the ONNX export test wrote (or set QAT_ONNX_DIR)")
    images = np.load(os.path.join(a.dir, "inputs.npy")).astype(np.float32)
    print(f"onnxruntime {ort.__version__}, {RUNS} runs after {WARMUP} warm-up, median (min-max) us")
    for name in a.models.split(","):
        path = os.path.join(a.dir, f"{name}.onnx")
        for threads in (int(t) for t in a.threads.split(",")):
            sess = session(path, threads)
            for batch in (int(b) for b in a.batch.split(",")):
                reps = -(-batch // len(images))
                x = np.ascontiguousarray(np.concatenate([images] * reps)[:batch])
                med, lo, hi = time_cell(sess, x)
                print(
                    f"ort {name} threads={threads} batch={batch}: "
                    f"{med:.1f} ({lo:.1f}-{hi:.1f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
