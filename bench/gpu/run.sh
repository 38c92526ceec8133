#!/usr/bin/env bash
# GPU benchmark, run once on a lent GPU machine from the repository root:
#     bash bench/gpu/run.sh            (results in $OUT/gpu_bench.json when $OUT is set)
# Needs only what the GPU image has (python3 with torch + transformers); no network, no pip.
# Finishes in under 6 minutes: the script stops starting cases after --budget-s (default 300 s)
# and this wrapper kills it at 350 s; partial results are written after every case.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv 2>/dev/null || true
python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
timeout -k 5 350 python3 -u bench/gpu/gpu_bench.py "$@"
rc=$?
if [ -n "${OUT:-}" ] && [ -f "$OUT/gpu_bench.json" ]; then echo "results: $OUT/gpu_bench.json"; fi
exit $rc
