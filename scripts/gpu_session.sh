#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md records, in two parts that each fit one 10-minute call
# of a lent GPU machine (and its 30-minute session budget, machine start included):
#
#   bash scripts/gpu_session.sh bench OUT   # throughput/MFU vs BertForMaskedLM, a kernel profile,
#                                           # rtx2080ti + rtxa4000 emulation (~6 minutes on an H100)
#   bash scripts/gpu_session.sh train OUT   # pytest -m gpu, then cram data + a 60 s budgeted run (~4 minutes)
#
# Each step has its own time limit and writes its JSON/log; a failing step is recorded in
# status.txt and the next one still runs. The device tool brings back at most 8 files, so
# everything ends up in two: OUT/<part>-summary.md (the tables printed, step statuses) and
# OUT/<part>.tgz (every JSON, log and profile table).
set -uo pipefail

part=${1:?usage: gpu_session.sh bench|train OUT}
dest=${2:?usage: gpu_session.sh bench|train OUT}
out="$dest/$part"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CRAMMING_NO_PROGRESS=1
cram=(python3 -m cramming.cli)

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its output, record its status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$out/status.txt"
    { echo "## $name (rc=$rc, $((SECONDS - start)) s)"; echo; echo '`'"$*"'`'; echo; grep '^|' "$out/$name.log"; grep -h 'profile (' "$out/$name.log"; echo; } >>"$out/summary.md"
}

python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >"$out/device.txt" 2>&1

case $part in
bench)
    step bench_256 240 "${cram[@]}" bench model --device cuda --precision bf16 --compile --batch-size 256 \
        --repeats 5 --steps 10 --out "$out/bench_256.json" --profile "$out/profile_256.txt"
    step bench_128 150 "${cram[@]}" bench model --device cuda --precision bf16 --compile --batch-size 128 \
        --repeats 5 --steps 10 --out "$out/bench_128.json"
    for card in rtx2080ti rtxa4000; do
        step "emulate_$card" 120 "${cram[@]}" bench model --device cuda --emulate "$card" --compile --no-baseline \
            --repeats 1 --steps 3 --warmup 2 --out "$out/emulate_$card.json"
    done
    ;;
train)
    step pytest_gpu 200 python3 -m pytest -q -m gpu tests/test_model_gpu.py
    step data 120 "${cram[@]}" data data=embedded paths.out_root="$out/runs"
    step pretrain_60s 200 "${cram[@]}" pretrain data=embedded budget=60s arch=crammed-bert \
        paths.out_root="$out/runs" run_name=gpu60
    cp "$out/runs/pretrain/gpu60/summary.json" "$out/pretrain_summary.json" 2>/dev/null
    rm -rf "$out/runs"  # checkpoints and exports are too large to bring back
    ;;
*)
    echo "unknown part $part (bench | train)" >&2
    exit 2
    ;;
esac
cat "$out/status.txt" >>"$out/summary.md"
cp "$out/summary.md" "$dest/$part-summary.md"
tar -czf "$dest/$part.tgz" -C "$dest" "$part" && rm -rf "$out"
cat "$dest/$part-summary.md"
