#!/usr/bin/env bash
# The engine's GPU checks in one run, well under 10 minutes on one H200:
#   0. tests/test_kernels.py on the GPU: the compiled Triton recurrence kernels against snnTorch step
#      by step (bit-identical spikes and membranes, gradients within rounding), and
#      tests/test_sb3_conformance.py (SB3's save/load round trips, a model loaded onto the GPU);
#   1. bench_engine.py --device cuda at T = 8, 16, 64: greedy action, training step (target: <= 4 ms
#      and >= 5x faster than the naive snnTorch loop at T = 64, batch 32) and peak memory, every
#      contender;
#      then --profile at T = 64 for spikeq fused, spikingjelly and the dense floor: each one's CUDA
#      kernels with the most time in one training step (profile.txt);
#   2. bench_presets.py --device cuda, paper preset, Pong, 8 envs through ale-py's vector env: agent
#      steps per second of the whole training loop (target: >= 1,000 for the DSQN), and the ANN DQN;
#   3. `spikeq train --device cuda` on MinAtar/Breakout (minatar preset, DSQN and DQN, 20k steps, 5k of
#      them random): a real run end to end on the GPU, its train.csv rows and its wall time.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # tables in OUT_DIR (default: $OUT, else bench-gpu)
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh /tmp/check   # dry run of the script on a CPU
#
# A step that fails does not stop the later ones; the script exits non-zero if any failed.
# Needs spikeq's dependencies importable by $PYTHON (default: .venv/bin/python if there, else python3);
# spikeq itself is read from src/. On a machine without a package index, carry the wheels (see
# benchmarks/README.md, "GPU").
set -euo pipefail
out=${1:-${OUT:-bench-gpu}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then python=${PYTHON:-.venv/bin/python}; else python=${PYTHON:-python3}; fi
device=${DEVICE:-cuda}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${QUICK:-0}" = 1 ]; then
    engine_args=(--quick) loop_steps=256 profile_steps=8
else
    engine_args=(--steps 8 16 64) loop_steps=4000 profile_steps=64
fi
{
    date -u
    "$python" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
    "$python" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
} | tee "$out/machine.txt"
status=0
"$python" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_sb3_conformance.py 2>&1 |
    tee "$out/kernels.txt" || status=1
"$python" benchmarks/bench_engine.py --device "$device" --loop-steps 0 "${engine_args[@]}" 2>&1 |
    tee "$out/engine.txt" || status=1
others=("spikeq fused, torch loop" "spikeq fused+recompute" "spikeq snntorch" "snntorch naive"
    "spikeq fused, detach_reset=False" "spikingjelly, detach_reset=False" "ANN DQN")
"$python" benchmarks/bench_engine.py --device "$device" --loop-steps 0 --steps "$profile_steps" \
    --train-repeats 1 --action-calls 1 --profile 15 --skip "${others[@]}" 2>&1 | tee "$out/profile.txt" || status=1
"$python" benchmarks/bench_presets.py --device "$device" --presets paper --models dsqn dqn \
    --n-envs 8 --vec-env ale --steps "$loop_steps" 2>&1 | tee "$out/loop.txt" || status=1
if [ "${QUICK:-0}" = 1 ]; then train_steps=(--steps 2000 --learning-starts 500); else
    train_steps=(--steps 20000 --learning-starts 5000); fi
for model in dsqn dqn; do
    run_dir=$(mktemp -d)
    {
        start=$(date +%s)
        "$python" -m spikeq.cli train --game MinAtar/Breakout --model "$model" --preset minatar \
            "${train_steps[@]}" --final-eval-episodes 2 --device "$device" --wandb disabled \
            --run-dir "$run_dir/run" 2>&1 | tr '\r' '\n' | grep -v -e '^ *$' -e 'it/s\]$' | tail -n 5
        echo "wall time $(($(date +%s) - start)) s"
        (head -n 1 "$run_dir/run/train.csv"; tail -n 2 "$run_dir/run/train.csv") | cut -d, -f1-13
    } 2>&1 | tee "$out/minatar-$model.txt"
    grep -q '^finished' "$out/minatar-$model.txt" || status=1
done
exit $status
