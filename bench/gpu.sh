#!/usr/bin/env bash
# Throughput of the full AltCLIP (ViT-L/14 + XLM-R large, random weights) on one CUDA GPU, in
# float16 and bfloat16 (attention: SDPA), against the naive transformers loop and the towers
# alone, each in the same dtype. One run shares the corpus and the model between the two dtypes.
# Sized to finish in under 8 minutes on a 16-core H100 host with nothing cached, about 5.5 by
# estimate: building the 3.3 GB model (~20 s) and the corpus (~0.4 core-s per JPEG, in
# parallel), then for each dtype the naive loop, the longest part (one CPU core decodes and
# resizes each photo, ~65 ms at the corpus's mean 3.2 MP: ~65 s), the ceiling and ours (about a
# minute together). Rerun, it reuses the model and the corpus.
#
#   bench/gpu.sh                       # from anywhere; runs in the repository root
#   ROWS=4000 BATCH_SIZE=128 bench/gpu.sh
#
# Environment: PYTHON (default python3) must have the project and a CUDA build of torch;
# ROWS (1000), BATCH_SIZE (256); BENCH_OUT, the folder for the JSON report (default $OUT if set,
# else ./bench-results); ALTCLIP_CACHE, where models and corpora are cached (~/.cache/altclip-pipeline).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROWS=${ROWS:-1000}
BATCH_SIZE=${BATCH_SIZE:-256}
RESULTS=${BENCH_OUT:-${OUT:-bench-results}}

if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "bench/gpu.sh: $PYTHON has no CUDA device through torch (torch missing, a CPU build, or" \
         "no GPU visible); run it on a CUDA machine with a CUDA build of torch" >&2
    exit 1
fi
if ! "$PYTHON" -c "import jobs.cli, pipeline.embed.model, ray, transformers" 2>/dev/null; then
    echo "bench/gpu.sh: the project is not importable with $PYTHON; pip install -e . first" >&2
    exit 1
fi

mkdir -p "$RESULTS"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -m bench.throughput --config full --rows "$ROWS" --batch-size "$BATCH_SIZE" \
    --dtype float16 bfloat16 --device cuda --json "$RESULTS/throughput-full-cuda.json"
echo "bench/gpu.sh: done in ${SECONDS} s; report in $RESULTS/throughput-full-cuda.json" >&2
