#!/usr/bin/env bash
# Run a torchrun job (scripts/infer.py) under Nsight Systems and turn its NVTX ranges into the
# per-layer, per-rank MoE phase table of scripts/trace_report.py.
#
#   scripts/nsys.sh [nsys profile options --] <torchrun arguments...>
#   scripts/nsys.sh -- --nproc-per-node 2 scripts/infer.py --run-config demo
#   scripts/nsys.sh --delay 20 -- --nproc-per-node 8 scripts/infer.py --router laser --compare
#
# Captures CUDA, NVTX (the recorder's moe/* ranges; NCCL's own ranges, NCCL_NVTX_DISABLE=0),
# OS runtime and cuBLAS activity into $NSYS_OUT.nsys-rep, exports the NVTX ranges with
# `nsys stats` (nvtx_gpu_proj_trace: GPU time of each range, and nvtx_pushpop_trace: CPU
# push/pop times) as CSV beside it, and writes the table as $NSYS_OUT_moe.json (markdown on
# stdout): GPU time when the capture projected ranges onto a GPU, CPU time otherwise.
#
# Environment: NSYS_OUT (report path without suffix; default results/nsys/<date-time>),
# TORCHRUN (default: torchrun), PYTHON (default: python), NSYS_DRY_RUN=1 (print the commands,
# run nothing).
set -euo pipefail

prog=nsys.sh
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

nsys_args=()
for arg in "$@"; do
    if [[ "$arg" == "--" ]]; then  # nsys options come before a "--"
        while [[ "$1" != "--" ]]; do nsys_args+=("$1"); shift; done
        shift
        break
    fi
done
if (( $# == 0 )); then
    echo "$prog: error: no torchrun arguments" \
        "(e.g. scripts/nsys.sh -- --nproc-per-node 2 scripts/infer.py --run-config demo)" >&2
    exit 2
fi

dry="${NSYS_DRY_RUN:-0}"
run() {
    if [[ "$dry" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ "$dry" != 1 ]] && ! command -v nsys >/dev/null 2>&1; then
    echo "$prog: error: nsys (Nsight Systems) is not on PATH; record torch.profiler traces" \
        "instead with infer.py --profile DIR and read them with scripts/trace_report.py DIR" >&2
    exit 127
fi

out="${NSYS_OUT:-results/nsys/$(date +%Y%m%d-%H%M%S)}"
run mkdir -p "$(dirname "$out")"
export NCCL_NVTX_DISABLE=0  # NCCL's collectives as NVTX ranges (its default, stated)

read -r -a torchrun <<< "${TORCHRUN:-torchrun}"
run nsys profile --trace=cuda,nvtx,osrt,cublas --cuda-memory-usage=false --force-overwrite=true \
    -o "$out" ${nsys_args[@]+"${nsys_args[@]}"} "${torchrun[@]}" "$@"

run nsys stats --report nvtx_pushpop_trace --format csv --force-export=true --output "$out" \
    "$out.nsys-rep"
# GPU projections (newer nsys); a CPU-only capture has none and the push/pop times are used
run nsys stats --report nvtx_gpu_proj_trace --format csv --force-export=true --output "$out" \
    "$out.nsys-rep" \
    || echo "$prog: no nvtx_gpu_proj_trace report from this nsys; using CPU push/pop times" >&2

csv="${out}_nvtx_gpu_proj_trace.csv"
if [[ "$dry" == 1 ]] || ! grep -q "moe/" "$csv" 2>/dev/null; then
    csv="${out}_nvtx_pushpop_trace.csv"
fi
run "${PYTHON:-python}" "$here/trace_report.py" --nsys-csv "$csv" --out "${out}_moe.json"
