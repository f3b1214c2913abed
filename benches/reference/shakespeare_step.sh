#!/usr/bin/env bash
# The training step of the tiny-shakespeare Llama (issue: the second main job), ours against the
# PyTorch + torchao reference, measured back to back in one sitting, interleaved round by round.
#
#   PY=/path/to/python-with-torch-torchao ROUNDS=3 bash benches/reference/shakespeare_step.sh [OUT]
#
# Ours: `examples/shakespeare_qat.rs` with short phases (--float-steps 35 --qat-steps 35, q4_0),
# whose printed medians are the float step and the QAT q4_0 step (batch 32 x 64, batch sampling
# included). The reference: benches/reference/tinyllama_qat.py --timing-only (5 warm-up steps,
# then 30 timed steps round-robin between float and q4_0 on pre-drawn batches; zero_grad +
# forward + loss + backward + AdamW), from a float checkpoint of a 20-step smoke run made once
# in OUT/ref (step time does not depend on the weights). Each round runs, at 1 then 2 threads,
# ours then the reference. Prints one line per measurement and, at the end, per thread count
# and config, the median over the rounds of each side and their ratio (ours / reference; <= 1.0:
# ours faster).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
ROUNDS=${ROUNDS:-3}
OUT=${1:-target/shakespeare-step}
LOG="$OUT/steps.log"
mkdir -p "$OUT/ref" "$OUT/ours"
cargo build --release --example shakespeare_qat >&2
if [ ! -f "$OUT/ref/float_seed0.pt" ]; then
  "$PY" benches/reference/tinyllama_qat.py --float-steps 20 --qat-steps 2 --skip-timing \
    --schemes q4_0 --eval-windows 8 --eval-every 0 --qat-eval-every 0 --threads 2 \
    --out-dir "$OUT/ref" > "$OUT/ref/smoke.txt"
fi
: > "$LOG"
for r in $(seq 1 "$ROUNDS"); do
  for th in 1 2; do
    ours=$(./target/release/examples/shakespeare_qat --threads "$th" --float-steps 35 \
      --qat-steps 35 --final-windows 4 --eval-every 0 --sample-chars 1 --out "$OUT/ours" 2>&1)
    f=$(sed -n 's/^ *float  *35 steps  median *\([0-9.]*\) ms.*/\1/p' <<< "$ours")
    q=$(sed -n 's/^ *QAT q4_0  *35 steps  median *\([0-9.]*\) ms.*/\1/p' <<< "$ours")
    echo "round $r threads $th ours float $f qat_q4_0 $q load $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$LOG"
    ref=$("$PY" benches/reference/tinyllama_qat.py --timing-only --timing-threads "$th" \
      --schemes q4_0 --out-dir "$OUT/ref" 2>&1)
    rf=$(awk '$1 == "float" && $2 == "'"$th"'" {print $3; exit}' <<< "$ref")
    rq=$(awk '$1 == "q4_0" && $2 == "'"$th"'" {print $3; exit}' <<< "$ref")
    echo "round $r threads $th ref float $rf qat_q4_0 $rq load $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$LOG"
  done
done
"$PY" - "$LOG" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
print("threads  config    ours ms (rounds)            reference ms (rounds)       ours/ref")
for th in ("1", "2"):
    for cfg, col in (("float", 6), ("q4_0", 8)):
        o = [float(r[col]) for r in rows if r[3] == th and r[4] == "ours"]
        p = [float(r[col]) for r in rows if r[3] == th and r[4] == "ref"]
        mo, mp = statistics.median(o), statistics.median(p)
        print(f"{th:>7}  {cfg:<6} {mo:8.1f} ({', '.join(f'{v:.1f}' for v in o)})"
              f"   {mp:8.1f} ({', '.join(f'{v:.1f}' for v in p)})   {mo / mp:.3f}")
EOF
