#!/usr/bin/env bash
# The prepared GPU benchmark (issues 14 and 19): at most 8 minutes on one GPU, results in one Markdown + JSON file:
# forward ceilings (eager and torch.compile, batches up to 16,384), the evaluator against the per-point loop, the
# 51x51 ResNet-56 plane, `python -m pytest -m gpu`, the trainer's images/s (PreResNet-110), Hessian-vector
# products against a double-backward loop, VGG16-BN, the lever matrix (K, graphs, compile); targets checked.
#
#   bash benchmarks/gpu.sh                   # CUDA: benchmarks/results/gpu-<date>.md (+ .json)
#   bash benchmarks/gpu.sh --out FILE.md     # elsewhere
#   bash benchmarks/gpu.sh --dry-run         # the same code on CPU with tiny sizes (the tests run this)
#
# Other flags go to benchmarks/gpu_bench.py (--models, --deadline, --no-plane, --no-pytest, --commit,
# --cudnn-benchmark). The run's own deadline is 450 s (each measurement also has its own budget, the GPU tests at
# most 200 s); this wrapper kills it at 480 s whatever happens, and the results file keeps everything measured
# before that. Inductor's compiled kernels are kept in ~/.cache/widthkit/inductor ($TORCHINDUCTOR_CACHE_DIR), so
# a second run compiles less.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python}"
limit=480
for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then limit=170; fi
done
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
commit_args=()
if [[ " $* " != *" --commit "* ]] && git -C "$root" rev-parse --short HEAD >/dev/null 2>&1; then
    commit_args=(--commit "$(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet HEAD -- 2>/dev/null || echo '+uncommitted changes')")
fi
exec timeout --signal=TERM --kill-after=10 "$limit" "$python" "$here/gpu_bench.py" ${commit_args[@]+"${commit_args[@]}"} "$@"
