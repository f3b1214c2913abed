"""Summarises a log of benches/reference/int8_vs_onnxruntime.sh: per model, threads and
batch, the median over rounds of each side's per-run median (microseconds), the ratio
onnxruntime / ours of those (> 1: ours faster) with the range of the per-round ratios, for
our dispatched kernel and for the AVX2 one; at each batch, int8 against our float model
(BN folded); and the ratio of the fastest runs over all rounds (the least disturbed by other
load on a shared machine). Also the load averages logged.

    python benches/reference/int8_summary.py target/int8_vs_onnxruntime.log
"""

import re
import statistics
import sys
from collections import defaultdict

LINE = re.compile(
    r"^(?:ours kernel=(\S+) (\S+) (\S+)|ort (\S+)) threads=(\d+) batch=(\d+): ([\d.]+) \(([\d.]+)"
)
ORT_NAME = {"mnist_net_x86": "mnist", "residual_x86": "residual"}


def main():
    runs = defaultdict(list)  # (side, model, threads, batch) -> per-round medians
    fastest = defaultdict(list)  # the same -> per-round minima
    loads = []
    for line in open(sys.argv[1]):
        if line.startswith("# round"):
            loads.append(float(line.split("load ")[1].split()[0]))
            continue
        m = LINE.match(line)
        if not m:
            continue
        kernel, model, variant, ort_model, t, b, med, lo = m.groups()
        if ort_model:
            side, model = "ort", ORT_NAME[ort_model]
        else:
            side = f"{variant}/{kernel}"
        runs[(side, model, int(t), int(b))].append(float(med))
        fastest[(side, model, int(t), int(b))].append(float(lo))
    if loads:
        print(f"load average (1 min) at the runs: {min(loads):.2f}-{max(loads):.2f}")
    print(
        "| model | threads | batch | onnxruntime us | ours int8 us | ratio (range) "
        "| ours AVX2 us | ratio (range) | int8 / float | ratio of minima: ours, AVX2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in ("mnist", "residual"):
        for t in (1, 2):
            for b in (1, 64):
                ort = runs.get(("ort", model, t, b))
                if not ort:
                    continue
                cells = [model, str(t), str(b), f"{statistics.median(ort):.1f}"]
                for side in ("int8/auto", "int8/avx2"):
                    ours = runs.get((side, model, t, b), [])
                    if not ours:
                        cells += ["-", "-"]
                        continue
                    per_round = [o / u for o, u in zip(ort, ours)]
                    ratio = statistics.median(ort) / statistics.median(ours)
                    cells += [
                        f"{statistics.median(ours):.1f}",
                        f"{ratio:.2f} ({min(per_round):.2f}-{max(per_round):.2f})",
                    ]
                fl = runs.get(("float_bn_folded/auto", model, t, b))
                q = runs.get(("int8/auto", model, t, b))
                cells.append(
                    f"{statistics.median(fl) / statistics.median(q):.2f}x" if fl and q else "-"
                )
                lo_ort = min(fastest[("ort", model, t, b)])
                cells.append(
                    ", ".join(
                        f"{lo_ort / min(fastest[(side, model, t, b)]):.2f}"
                        if fastest.get((side, model, t, b))
                        else "-"
                        for side in ("int8/auto", "int8/avx2")
                    )
                )
                print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
