#!/usr/bin/env bash
# One acceptance run of the paths users take at scale, printed as one table: bench XL/2 batch 32 bf16 eager
# and compiled (ms/step, img/s, peak GiB, MFU), guided sampling throughput of XL/2, a 300-step demo run in
# bf16 (final loss), torchrun --nproc_per_node=1 (NCCL and DDP), `extract` of an image folder into a token
# folder, training from it under torchrun with DataLoader workers, --grad-accum 2 --grad-checkpoint --compile
# and --sample-every, SIGTERM to torchrun's agent and the printed resume, and `sample --fid-ref` end to end
# (a random-weight Inception made on the spot: no download).
# On a GPU it takes ~10 minutes at most; on a CPU it runs a reduced version (T/2 shapes) in ~6 minutes, which
# the test suite runs, so it cannot rot.   usage: bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-$(mktemp -d)}")
mkdir -p "$out"
export TORCH_HOME="$out/torch_home"  # the random Inception's cache, not the user's
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    bench=(--model XL/2 --batch-size 32 --precision bf16 --steps 10 --warmup 3)
    samp=(--model XL/2 --batch-size 32 --precision bf16 --sample --cfg-scale 1.5 --steps 10 --warmup 2)
    demo=(--steps 300 --precision bf16 --log-every 50)
    nccl=(--steps 10 --precision bf16 --log-every 5 --demo-size 2000)
    tokens=(--model S/2 --precision bf16 --steps 40 --num-workers 4 --global-batch-size 64)
    samples=1000
else
    echo "no GPU: the reduced CPU version" >&2
    small=(--model T/2 --latent-size 8 --codebook-size 256 --batch-size 16 --precision fp32)
    bench=("${small[@]}" --steps 3 --warmup 1)
    samp=("${small[@]}" --sample --cfg-scale 1.5 --steps 4 --warmup 1)
    demo=(--steps 30 --log-every 10 --demo-size 2000 --precision fp32)
    nccl=(--steps 10 --log-every 5 --demo-size 2000 --precision fp32)
    tokens=(--model N/4 --precision fp32 --steps 8 --num-workers 2 --global-batch-size 16)
    samples=100
fi
row() { printf '| %-34s | %-9s | %s |\n' "$1" "$2" "$3"; }
check() {  # name, log file, command...: one table row with the line that matters
    local name=$1 log=$2; shift 2
    local t0=$SECONDS limit=(timeout 400)
    declare -F "$1" >/dev/null && limit=()  # a function of this script bounds its own waits
    if "${limit[@]}" "$@" >"$log" 2>&1; then
        row "$name" "ok $((SECONDS - t0)) s" "$(grep -E "$PATTERN" "$log" | tail -1)"
    else
        row "$name" "FAILED" "$(tail -1 "$log")"
    fi
}
torchrun=(python -m torch.distributed.run --standalone --nproc_per_node=1)
echo "| check | status | result |"
echo "|---|---|---|"
PATTERN="ms/step" check "bench train eager" "$out/bench.log" python purr.py bench "${bench[@]}"
PATTERN="ms/step" check "bench train compiled" "$out/bench_compiled.log" \
    python purr.py bench "${bench[@]}" --compile
PATTERN="NFE/s" check "bench sampling, cfg 1.5" "$out/bench_sample.log" python purr.py bench "${samp[@]}"
PATTERN="^step " check "demo train (final loss)" "$out/demo.log" \
    python purr.py train "${demo[@]}" --results-dir "$out/demo"
PATTERN="DDP\)" check "torchrun 1 process, 10 steps" "$out/torchrun.log" \
    "${torchrun[@]}" purr.py train "${nccl[@]}" --results-dir "$out/ddp"

# extract: the demo run's tiny tokenizer encodes an image folder of demo images
demo_ckpt=$(ls "$out"/demo/*/checkpoints/*.pt 2>/dev/null | tail -1)
python - "$out/images" <<'EOF'
import os, sys
from PIL import Image
import appendix
images, labels = appendix.demo_dataset(256)
for i, (x, y) in enumerate(zip(images, labels)):
    folder = os.path.join(sys.argv[1], appendix.DEMO_CLASSES[y])
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:04d}.png"))
EOF
PATTERN="done" check "extract, torchrun" "$out/extract.log" "${torchrun[@]}" purr.py extract \
    --data "$out/images" --vq tiny --vq-ckpt "$demo_ckpt" --image-size 32 --out "$out/tokens" --num-workers 2
PATTERN="^step " check "tokens+workers+accum+ckpt+compile" "$out/tokens.log" "${torchrun[@]}" purr.py \
    train --data "$out/tokens" "${tokens[@]}" --grad-accum 2 --grad-checkpoint --compile --log-every 4 \
    --sample-every 4 --results-dir "$out/tokens_run"
grids=$(ls "$out"/tokens_run/*/samples/*.png 2>/dev/null | wc -l)
row "--sample-every grids" "$([ "$grids" -ge 2 ] && echo ok || echo FAILED)" "$grids grids"

# SIGTERM to torchrun's agent mid-run: the processes save; the printed command resumes
sigterm() {
    "${torchrun[@]}" purr.py train --data "$out/tokens" "${tokens[@]}" --steps 100000 --log-every 1 \
        --results-dir "$out/preempt" >"$out/preempt.log" 2>&1 &
    local pid=$! waited=0
    until grep -q "^step 3 " "$out/preempt.log" || [ $waited -ge 300 ]; do sleep 1; waited=$((waited + 1)); done
    kill -TERM $pid
    wait $pid
    local line resume at
    line=$(grep -o "stopped by signal at step [0-9]*.*" "$out/preempt.log") || return 1
    at=$(echo "$line" | grep -o "step [0-9]*" | grep -o "[0-9]*")
    resume=$(echo "$line" | sed 's/.*resume with: .*purr[.]py //')
    "${torchrun[@]}" purr.py $resume --steps $((at + 2)) --log-every 1 || return 1
    echo "SIGTERM at step $at: saved, exit; resumed to step $((at + 2))"
}
PATTERN="^SIGTERM" check "SIGTERM to torchrun, resume" "$out/sigterm.log" sigterm

# sample --fid-ref: a random-weight Inception and reference statistics of the image folder
python -c "import os, sys, torch, fid; torch.manual_seed(0); d = os.path.join(torch.hub.get_dir(), 'checkpoints')
os.makedirs(d, exist_ok=True); torch.save(fid.InceptionV3().state_dict(), os.path.join(d, fid.WEIGHTS))"
python fid.py --save-stats "$out/images" "$out/ref.npz" >"$out/ref.log" 2>&1
PATTERN="^FID" check "sample --fid-ref, random Inception" "$out/fid.log" "${torchrun[@]}" purr.py sample \
    --ckpt "$(ls "$out"/tokens_run/*/checkpoints/*.pt | tail -1)" --num-samples "$samples" --num-steps 10 \
    --out "$out/samples.npz" --fid-ref "$out/ref.npz"
