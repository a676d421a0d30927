#!/usr/bin/env bash
# One acceptance run of the paths users take at scale, printed as one table:
#   bench XL/2 batch 32 bf16 eager and compiled (ms/step, img/s, peak GiB, MFU), guided sampling throughput
#   of XL/2, a 300-step demo run in bf16 (final loss), and torchrun --nproc_per_node=1 (NCCL) for 10 steps.
# On a GPU it takes ~8 minutes at most; on a CPU it runs a reduced version (T/2 shapes) in ~3 minutes, so
# it cannot rot.   usage: bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d)}
mkdir -p "$out"
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    bench=(--model XL/2 --batch-size 32 --precision bf16 --steps 10 --warmup 3)
    samp=(--model XL/2 --batch-size 32 --precision bf16 --sample --cfg-scale 1.5 --steps 10 --warmup 2)
    demo=(--steps 300 --precision bf16 --log-every 50)
    nccl=(--steps 10 --precision bf16 --log-every 5 --demo-size 2000)
else
    echo "no GPU: the reduced CPU version" >&2
    small=(--model T/2 --latent-size 8 --codebook-size 256 --batch-size 16 --precision fp32)
    bench=("${small[@]}" --steps 3 --warmup 1)
    samp=("${small[@]}" --sample --cfg-scale 1.5 --steps 4 --warmup 1)
    demo=(--steps 30 --log-every 10 --demo-size 2000 --precision fp32)
    nccl=(--steps 10 --log-every 5 --demo-size 2000 --precision fp32)
fi
row() { printf '| %-34s | %-9s | %s |\n' "$1" "$2" "$3"; }
check() {  # name, log file, command...: one table row with the line that matters
    local name=$1 log=$2; shift 2
    local t0=$SECONDS
    if timeout 300 "$@" >"$log" 2>&1; then
        row "$name" "ok $((SECONDS - t0)) s" "$(grep -E "$PATTERN" "$log" | tail -1)"
    else
        row "$name" "FAILED" "$(tail -1 "$log")"
    fi
}
echo "| check | status | result |"
echo "|---|---|---|"
PATTERN="ms/step" check "bench train eager" "$out/bench.log" python purr.py bench "${bench[@]}"
PATTERN="ms/step" check "bench train compiled" "$out/bench_compiled.log" \
    python purr.py bench "${bench[@]}" --compile
PATTERN="NFE/s" check "bench sampling, cfg 1.5" "$out/bench_sample.log" python purr.py bench "${samp[@]}"
PATTERN="^step " check "demo train (final loss)" "$out/demo.log" \
    python purr.py train "${demo[@]}" --results-dir "$out/demo"
PATTERN="^step " check "torchrun 1 process, 10 steps" "$out/torchrun.log" \
    python -m torch.distributed.run --standalone --nproc_per_node=1 purr.py train "${nccl[@]}" \
    --results-dir "$out/ddp"
