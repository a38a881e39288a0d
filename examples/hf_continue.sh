#!/usr/bin/env bash
# Give a pretrained Hugging Face model a memory: the workflow of docs/hf.md, at laptop scale.
#
# A small random-init Llama (4 layers, hidden 128, the built-in GPT-2 tokenizer) is pretrained
# on the built-in corpus (KJV) without memory, exported as a model directory, then continued
# for the same number of steps in five ways, each at seeds 0, 1, 2:
#   plain            the base alone, trained further
#   adapter          Engram added, base frozen (only Engram trains)
#   full             Engram added, base trains too
#   full-noinfo      as full, but every n-gram reads row 0 (engram.addressing=constant)
#   adapter-noinfo   as adapter, no-information control
#   full-demo        as full, with the table settings the BPE demo chose by measurement
#   adapter-demo     as adapter, likewise   (tables N(0, 0.1), table lr x100; docs/controls.md)
# Every other run uses engram's defaults (lr 3e-3, table lr x5, tables N(0, 1), Engram at
# layers 1 and 2 with ~20k rows per sub-table); only batch size, step counts and threads are
# set, for compute. Runs that already finished are only re-evaluated.
# Usage: examples/hf_continue.sh WORKDIR [JOBS]    (about 1 h on 2 cores with JOBS=2)
set -euo pipefail
W=${1:?usage: hf_continue.sh WORKDIR [JOBS]}
JOBS=${2:-2}
THREADS=$(( $(nproc) / JOBS )); (( THREADS >= 1 )) || THREADS=1
PRE_STEPS=${PRE_STEPS:-600}
STEPS=${STEPS:-300}
mkdir -p "$W" && cd "$W"
COMMON=(--data builtin:kjv --no-progress --set data.batch_size=8 --set train.eval_every=100)

[[ -d bases/tiny ]] || engram base init --family llama --hidden 128 --layers 4 --heads 4 \
    --tokenizer gpt2 --out bases/tiny
if [[ ! -d bases/pretrained ]]; then
    engram train --base bases/tiny --no-engram --out runs/pretrain --steps "$PRE_STEPS" \
        "${COMMON[@]}" --set train.threads="$(nproc)"
    engram base export --ckpt runs/pretrain --out bases/pretrained
fi

arm_flags() {
    case $1 in
        plain) echo "--no-engram" ;;
        adapter) echo "--freeze-base" ;;
        full) echo "" ;;
        full-noinfo) echo "--set engram.addressing=constant" ;;
        adapter-noinfo) echo "--freeze-base --set engram.addressing=constant" ;;
        full-demo) echo "--set train.table_std=0.1 --set optim.table_lr_mult=100" ;;
        adapter-demo) echo "--freeze-base --set train.table_std=0.1 --set optim.table_lr_mult=100" ;;
    esac
}
export -f arm_flags
jobs_list=()
for seed in 0 1 2; do
    for arm in plain adapter full full-noinfo adapter-noinfo full-demo adapter-demo; do
        jobs_list+=("$arm $seed")
    done
done
printf '%s\n' "${jobs_list[@]}" | while read -r arm seed; do
    # a finished run is not retrained
    grep -q '"val_loss"' "runs/$arm-s$seed/metrics.jsonl" 2>/dev/null \
        && [[ $(tail -1 "runs/$arm-s$seed/metrics.jsonl") == *"\"step\": $STEPS,"* ]] || echo "$arm $seed"
done | xargs -P "$JOBS" -L 1 bash -c '
    arm=$0; seed=$1
    # shellcheck disable=SC2046
    engram train --base bases/pretrained $(arm_flags "$arm") --out "runs/$arm-s$seed" \
        --steps '"$STEPS"' --set train.seed="$seed" --set train.threads='"$THREADS"' \
        '"${COMMON[*]}"' > "runs/$arm-s$seed.log" 2>&1 && echo "done $arm seed $seed"'

# Validation loss on the held-out KJV chapters (each run's final evaluation, over the whole
# validation split, in its metrics.jsonl) and on a translation never trained on (BBE).
for run in runs/pretrain runs/*-s[0-9]; do
    printf '%s\tbuiltin:kjv\t%s\n' "$run" "$(tail -1 "$run/metrics.jsonl")"
done > evals.tsv
for run in runs/pretrain runs/*-s[0-9]; do echo "$run"; done | xargs -P "$JOBS" -L 1 bash -c \
    'printf "%s\tbuiltin:bbe\t%s\n" "$0" "$(engram eval --ckpt "$0" --data builtin:bbe --json)"' \
    >> evals.tsv
echo "wrote $W/evals.tsv"
python "$(dirname "$(readlink -f "$0")")/hf_continue_report.py" evals.tsv
