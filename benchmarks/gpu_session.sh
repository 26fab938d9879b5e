#!/usr/bin/env bash
# What kfdeploy measures and checks on a CUDA GPU, in one go (a lent GPU comes in short leases):
# the feed and throughput comparison (benchmarks/train.py --feeds-only), the paper
# configuration on a GPU budget (benchmarks/paper_config.py, steps sized by probe runs), and
# the GPU tests (the torch renderer and feeds on the device, training with CUDA graphs).
# The limits add up to under 10 minutes.
#
#   OUT=dir bash benchmarks/gpu_session.sh [TRAIN_SECONDS]    # results and full logs in dir
#
# Installs this checkout editable into the machine's own python3 with no dependencies and
# no index (an offline GPU machine has torch, timm, onnx and onnxruntime already; the
# export profiles are the package kfdeploy.profiles only through an install). Each part has
# its own time limit; the last lines of each log print.
set -u
out=${OUT:-benchmarks/results}
train_seconds=${1:-65}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1

part() {  # part NAME SECONDS COMMAND...: run it with its output in $out/NAME.log, then show how it ended
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local status=$?
    tail -n "${TAIL_LINES:-15}" "$out/$name.log" | tr '\r' '\n' | grep -v '^\s*$' | tail -n "${TAIL_LINES:-15}"
    echo "== $name: exit $status after $((SECONDS - started))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c 'import torch, timm, onnx, onnxruntime, numpy; print("torch", torch.__version__, "timm", timm.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__, "cuda", torch.cuda.is_available())'
part train-feeds 170 python3 benchmarks/train.py --feeds-only --compile reduce-overhead --out "$out"
# Teacher and factorize get the same seconds; the training throughput (teacher, factorize
# fused and unfused, in turns) takes 3 x 10 s, the composition one repeat.
part paper-config $((2 * train_seconds + 200)) python3 benchmarks/paper_config.py --train-seconds "$train_seconds" \
    --batch-size 512 --seconds 0.5 --repeats 1 --throughput-seconds 10 --out "$out"
part gpu-tests 90 python3 -m pytest -q -p no:cacheprovider -rs tests/test_feed.py
