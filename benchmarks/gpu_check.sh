#!/usr/bin/env bash
# The GPU acceptance check in one script: tests/test_gpu.py, then the GPU benchmarks (TopK
# tokens/s per SAE at d 768 -> 24,576 latents, k 32, 1 and 8 SAEs, float32 and bf16; the fp8
# decode on the device; the Reader into GPU memory; collection, i.e. the forward pass, on the
# GPU; 1 against 2 processes where 2 GPUs are visible), printed as one table. About 6 minutes
# on one H100 after `uv sync`. Where torch sees no GPU it says so in one line and exits 0.
#
#   bash benchmarks/gpu_check.sh [WORK_DIR]      (default /tmp/gpu_check; logs stay there)
#
# It runs under `uv run`. On a GPU node that cannot sync (no network, as cluster nodes often
# are), name a Python that already imports saesweep's dependencies instead:
#   GPU_CHECK_PYTHON=python3 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
work="${1:-/tmp/gpu_check}"
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    py=("$GPU_CHECK_PYTHON")
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    py=(uv run python)
fi
n_gpus=$("${py[@]}" -c \
    "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$n_gpus" = "0" ]; then
    echo "gpu_check: no GPU: torch sees no CUDA device here, so nothing was checked"
    exit 0
fi
rm -rf "$work" && mkdir -p "$work"
status=0
rows=()
row() { rows+=("$(printf '%-46s %s' "$1" "$2")"); echo "$1: $2"; }
last() { grep -v '^\s*$' "$1" | tail -1; }

"${py[@]}" -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$work/test_gpu.log" 2>&1 || status=1
row "tests/test_gpu.py" "$(last "$work/test_gpu.log")"

for n in 1 8; do
    for precision in float32 bf16; do
        flag=$([ "$precision" = bf16 ] && echo --bf16)
        log="$work/sae-$n-$precision.log"
        "${py[@]}" benchmarks/bench.py sae --device cuda --d-model 768 --n-latents 24576 --k 32 \
            --n-saes "$n" --steps 20 $flag > "$log" 2>&1 || status=1
        row "TopK x$n, 768 -> 24,576, k 32, $precision" "$(last "$log" | sed 's/.*: //')"
    done
done

"${py[@]}" benchmarks/bench.py decode --device cuda > "$work/decode.log" 2>&1 || status=1
row "fp8 decode on the GPU (4,096 x 768)" "$(grep 'fp8 x scale' "$work/decode.log" | head -1 \
    | sed 's/ *fp8 x scale -> fp32 (torch) *//')"

"${py[@]}" benchmarks/bench.py synth "$work/coll" --gb 1 > "$work/synth.log" 2>&1 || status=1
"${py[@]}" benchmarks/bench.py reader "$work/coll" --device cuda --repeat 2 --n-saes 1 \
    > "$work/reader.log" 2>&1 || status=1
row "Reader into GPU memory (1 GB bf16, 768)" \
    "$(grep '^reader ' "$work/reader.log" | awk '{print $3 " tokens/s, " $2 " MB/s"}')"

"${py[@]}" benchmarks/bench.py collect --max-tokens 200000 --out "$work/collect" \
    > "$work/collect.log" 2>&1 || status=1
row "forward pass (demo model, GPU)" "$(grep '^bare forward' "$work/collect.log" \
    | sed 's/bare forward pass: //')"
row "collection to local disk (GPU)" "$(grep 'to local' "$work/collect.log" | sed 's/.*): //')"

if [ "$n_gpus" -ge 2 ]; then
    "${py[@]}" benchmarks/bench_procs.py --uri "$work/collect-bfloat16" --device cuda --procs 1,2 \
        > "$work/procs.log" 2>&1 || status=1
    row "1 against 2 processes (see procs.log)" "$(last "$work/procs.log")"
else
    row "1 against 2 processes" "skipped: 1 GPU visible"
fi

echo
echo "gpu_check on $("${py[@]}" -c 'import torch; print(torch.cuda.get_device_name(0))') x $n_gpus (logs in $work):"
printf '%s\n' "${rows[@]}"
exit $status
