#!/bin/bash
# The checks and figures that need a GPU host, in one run (issue 13's GPU path):
#
#     bench/gpu.sh OUT_DIR [--quick]
#
# Run from the repository's root with a python3 that has torch with CUDA, safetensors,
# numpy, ml_dtypes and hostd's own dependencies. It writes into OUT_DIR:
#   facts.txt      nvidia-smi, and what hostd.hostfacts.detect() found
#   tests.txt      the tests that take a GPU, NVML or torch when present (pytest -rs: every
#                  skip says why)
#   loader_gpu.*   bench/loader_gpu.py: warm loads onto the device against
#                  safetensors.torch.load_file, the link's ceilings, and a staging sweep
#   overlap_gpu.*  bench/loader.py --device cuda: progressive loading onto the device
#   overlap_cpu.*  bench/loader.py on the CPU, on this machine's cores; loader_cpu.*, warm
#   relink.*       loads into numpy; link restores re-hashing 2 GiB of lent blobs;
#   small_files.*  bench/small_files.py on tmpfs: issue 11's small-file figures on this
#                  host's cores (these four skipped by --quick)
# Each step has a time limit of its own, so that one that hangs leaves the others' figures.
set -u
out=${1:?usage: bench/gpu.sh OUT_DIR [--quick]}
quick=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run it, its output to OUT_DIR/NAME.txt and stdout
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.txt"
    echo "== $name: rc=$rc in $((SECONDS - t0)) s"
}

{
    nvidia-smi
    nvidia-smi --query-gpu=index,name,memory.total,driver_version,mig.mode.current,pcie.link.gen.max,pcie.link.width.max --format=csv
    nproc
    "$py" -c 'import json; from hostd.hostfacts import detect; h = detect(); print(json.dumps(h.to_json(), indent=1)); print(h.memory()); h.close()'
    "$py" -c 'import torch, safetensors, numpy; print(torch.__version__, torch.version.cuda, safetensors.__version__, numpy.__version__)'
} >"$out/facts.txt" 2>&1
cat "$out/facts.txt"

step loader_gpu 180 "$py" bench/loader_gpu.py --rounds 5 --sweep --experiments \
    --json "$out/loader_gpu.json"
step tests 180 "$py" -m pytest -q -rs -p no:cacheprovider \
    tests/test_hostfacts.py tests/test_loader.py tests/test_load_snapshot.py \
    tests/test_kinds.py tests/test_compat.py tests/test_e2e_smoke.py tests/test_tier.py
step overlap_gpu 150 "$py" bench/loader.py --device cuda --rounds 3 --json "$out/overlap_gpu.json"
if [ "$quick" != --quick ]; then
    step overlap_cpu 120 "$py" bench/loader.py --rounds 3 --json "$out/overlap_cpu.json"
    step loader_cpu 90 "$py" bench/loader_cpu.py --rounds 3 --small 0 --json "$out/loader_cpu.json"
    step relink 90 "$py" bench/relink.py --large-mib 512 --rounds 3 --json "$out/relink.json"
    step small_files 240 "$py" bench/small_files.py --files 10000 --fs tmpfs --rounds 3 \
        --link-caller self --json "$out/small_files.json"
fi
