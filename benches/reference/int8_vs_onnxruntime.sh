#!/usr/bin/env bash
# Our int8 runtime against onnxruntime on the same models, interleaved: ROUNDS rounds (default
# 5), each at 1 and 2 threads, of (a) benches/int8_inference.rs in its plain mode with the
# kernel the CPU dispatches to, (b) the same with the AVX2 kernel (QAT_INT8_KERNEL=avx2),
# (c) benches/reference/onnxruntime_int8.py; every run logs the load average first. Then
# benches/reference/int8_summary.py prints the table (ratios of medians, per-round range).
#
#   QAT_ONNX_DIR=$PWD/target/onnx-check cargo test --test onnx_export   # the ONNX files
#   benches/reference/int8_vs_onnxruntime.sh target/onnx-check [LOG]
#
# PY (default target/onnx-venv/bin/python, the venv .ci/run makes) must have onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-target/onnx-check}
LOG=${2:-target/int8_vs_onnxruntime.log}
ROUNDS=${ROUNDS:-5}
PY=${PY:-target/onnx-venv/bin/python}
BIN=$(cargo bench --bench int8_inference --no-run 2>&1 | sed -n 's/.*Executable.*(\(.*\))$/\1/p')
[ -x "$BIN" ] || { echo "no int8_inference bench binary" >&2; exit 1; }
flags=$(grep -o -w 'avx2\|avx512_vnni\|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')
{
  echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); flags: $flags; $(nproc) CPUs"
  for r in $(seq 1 "$ROUNDS"); do
    for t in 1 2; do
      echo "# round $r threads $t load $(cut -d' ' -f1-3 /proc/loadavg)"
      QAT_BENCH_PLAIN=1 RAYON_NUM_THREADS=$t "$BIN" --bench | sed -n 's/^ours /ours kernel=auto /p'
      echo "# round $r threads $t load $(cut -d' ' -f1-3 /proc/loadavg)"
      QAT_INT8_KERNEL=avx2 QAT_BENCH_PLAIN=1 RAYON_NUM_THREADS=$t "$BIN" --bench \
        | sed -n 's/^ours \(.* int8 \)/ours kernel=avx2 \1/p'
      echo "# round $r threads $t load $(cut -d' ' -f1-3 /proc/loadavg)"
      "$PY" benches/reference/onnxruntime_int8.py "$DIR" --threads "$t" | grep '^ort '
    done
  done
} | tee "$LOG"
"$PY" benches/reference/int8_summary.py "$LOG"
