#!/usr/bin/env bash
# Every GPU figure of docs/training.md in one call, from the repository root of a CUDA machine:
#
#     PYTHONPATH=. bash bench/gpu.sh                     # at most 8 minutes on one H200 (estimated)
#     TDIFF_GPU_SMOKE=1 PYTHONPATH=. bash bench/gpu.sh   # tiny sizes on any device (tests/ run it on the CPU)
#
# 1. the training step (bench/train_throughput.py): d2s8i and d16 at width 512, batch 256, bf16, without
#    and with --compile, and d2s8i-tread without: model-only and full-loop images/s, their ratio, peak
#    memory, TFLOP/s and MFU; the input pipeline alone at batch 512;
# 2. `tdiff train --preset d2s8i` on a synthetic 50,000-image 32x32 .npz for 60 seconds (then SIGINT:
#    checkpoint and exit 130), and its metrics;
# 3. sampling (bench/sampling.py): d2s8i and d16 at width 512, DPM-Solver++(2M) 50 steps, batch 1024, in
#    fp32 (TF32), bf16, bf16 + compile, bf16 + compile + Δ-DiT cache (and bf16 + CUDA graphs for d2s8i):
#    images/s, TFLOP/s, projected paper-protocol and FID-50K times; then FID-50K of d2s8i end to end
#    (50,000 samples by bf16 + compile, then their Inception features).
# Uses the machine's own python3 (PYTHON=... to choose another) and writes only under $OUT or /tmp.
set -euo pipefail

python=${PYTHON:-python3}
work=${OUT:-$(mktemp -d)}/gpu-bench
mkdir -p "$work"

if [[ -n "${TDIFF_GPU_SMOKE:-}" ]]; then
    sizes=(--batch-size 4 --steps 1 --warmup 1 --set model.width=64 --set model.image_size=16)
    pipeline=(--pipeline-batch 16)
    precision=no compile=no seconds=15 images=256
    train_sets=(--set model.width=64 --set train.batch_size=4 --set train.log_every=5)
    sampling=(--image-size 16 --steps 2 --batch-size 4 --repeats 1 --feature-images 4 --feature-batch 4)
    sampling_runs=("--presets tiny --variants no,no+cache2 --full 8 --full-variant no")
else
    sizes=(--batch-size 256 --steps 10 --warmup 3)
    pipeline=(--pipeline-batch 512)
    precision=bf16 compile=no,yes seconds=60 images=50000 train_sets=()
    sampling=(--steps 50 --batch-size 1024 --repeats 2)
    sampling_runs=("--presets d2s8i --variants no,bf16,bf16+compile,bf16+compile+cache2,bf16+graphs --full 50000 --full-variant bf16+compile"
                   "--presets d16 --variants no,bf16,bf16+compile,bf16+compile+cache2")
fi

echo "== training step: d2s8i, d16 (compile $compile), then d2s8i-tread"
"$python" bench/train_throughput.py --presets d2s8i,d16 --mixed-precision "$precision" --compile "$compile" \
    "${sizes[@]}" "${pipeline[@]}"
"$python" bench/train_throughput.py --presets d2s8i-tread --mixed-precision "$precision" --compile no \
    "${sizes[@]}" --pipeline-batch 0

echo "== tdiff train --preset d2s8i on $images synthetic 32x32 images for ${seconds}s"
"$python" - "$work/synthetic.npz" "$images" <<'EOF'
import sys
import numpy as np
rng = np.random.default_rng(0)
n = int(sys.argv[2])
np.savez(sys.argv[1], images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels=rng.integers(0, 10, n))
EOF
rm -rf "$work/run"
status=0
timeout -s INT "$seconds" "$python" -m tdiff train --preset d2s8i --data "$work/synthetic.npz" --out "$work/run" \
    --mixed-precision "$precision" --steps 1000000 --eval-every 0 --set train.demo_every=0 --set train.log_every=50 \
    "${train_sets[@]}" || status=$?
# 124: timeout's own code when it had to send the signal; 130: tdiff's after writing its checkpoint.
[[ $status == 0 || $status == 124 || $status == 130 ]] || { echo "tdiff train failed with exit $status"; exit "$status"; }
"$python" - "$work/run/metrics.jsonl" <<'EOF'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
if not records:
    sys.exit("no metrics were logged")
rates = [r["images_per_second"] for r in records[1:]] or [records[0]["images_per_second"]]
last = records[-1]
print(f"steps {last['step']}, {last['elapsed_seconds']:.0f}s, loss {last['loss']:.4f}, ema loss {last['ema_loss']:.4f}, "
      f"images/s median {statistics.median(rates):,.0f} (first window {records[0]['images_per_second']:,.0f}), "
      f"peak memory {last.get('peak_memory_mib', float('nan')):,.0f} MiB")
for r in records[:: max(1, len(records) // 8)] + records[-1:]:
    print(json.dumps(r))
EOF

echo "== sampling: DPM-Solver++(2M), fp32 / bf16 / compile / cache; FID-50K end to end"
for run in "${sampling_runs[@]}"; do
    # shellcheck disable=SC2086  # each entry is a list of words
    "$python" bench/sampling.py $run "${sampling[@]}"
done
