#!/usr/bin/env bash
# GPU smoke test (issue 13): the product end to end on one CUDA GPU in <= 8 minutes.
#
#   bash bench/gpu_smoke.sh                 # on a node with one H100/H200
#   bash bench/gpu_smoke.sh --cpu-dry-run   # the same logic on the CPU at tiny sizes
#   OUT=/scratch/smoke bash bench/gpu_smoke.sh
#
# Parts, each with its assumed budget on one H100 (the sum is the <= 8 minute promise):
#   1. tiny t2v run, fp32, 100 steps                                     60 s
#   2. tiny t2v run, bf16 + torch.compile + full activation checkpointing,
#      100 steps (compile dominates)                                    120 s
#   3. resume: a run to N steps, the same command again to N+k          40 s
#   4. the sample CLI on part 3's run writes an mp4                     20 s
#   5. bench/step.py: dit_1b width at 256 px and the longest sequence
#      that fits (tokens/s, MFU, peak memory)                           120 s
#   6. bench/ring_kernel.py --versus-sdpa: cp attention modes vs SDPA    80 s
# Everything goes under ${OUT:-/tmp/gpu_smoke} (its runs/, samples/ and logs/ are emptied
# first, so no part resumes a previous smoke run); one markdown summary is printed at the
# end. The exit status is 1 when a part failed or a check did not hold.
set -euo pipefail

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
}

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_smoke.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
if [[ $DRY_RUN == 1 ]]; then
    DEVICE=cpu
    STEPS=6             # per tiny run
    RESUME_AT=3 RESUME_MORE=2
    # batch 2, no loader workers, one validation batch, 2-step samples: seconds, not
    # minutes; a log window of 2 steps so the last one misses start-up and compilation
    TINY=(recipe.batch_size=2 data.num_workers=0 trainer.val_batches=1 trainer.sample_steps=2
          trainer.log_every=2)
    SAMPLE_STEPS=2
    STEP_BENCH=(--device cpu --plan scale --width 64 --heads 2 --ffn-dim 128 --depth 1
                --latent 2 8 8 --max-tokens 256 --dtype fp32 --budget-s 0.5)
    ATTENTION_BENCH=(--device cpu --versus-sdpa --heads 2 --tokens 512 --calls 2)
else
    if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "gpu_smoke.sh: torch ($("$PY" -c 'import torch; print(torch.__version__)')) sees" \
             "no CUDA device (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-unset}'); run it" \
             "on a GPU node, or pass --cpu-dry-run to check the script on the CPU" >&2
        exit 1
    fi
    DEVICE=cuda
    STEPS=100
    RESUME_AT=20 RESUME_MORE=10
    TINY=()
    SAMPLE_STEPS=25
    # 8K tokens (256 px) then 16K, 32K, 64K: depth 24 runs out of an H100's 80 GB on the
    # way; a 64K step is ~5 s, so --max-step-s 8 stops before a 128K one (~20 s a step).
    STEP_BENCH=(--device cuda --max-tokens 65536 --max-step-s 8 --budget-s 2)
    # dit_1b has 16 heads (of 96); the kernel bench uses heads of 64: 16 of them
    ATTENTION_BENCH=(--device cuda --dtype bf16 --versus-sdpa --heads 16 --tokens 8192 65536
                     --calls 5)
fi

OUT=${OUT:-/tmp/gpu_smoke}
rm -rf "$OUT/runs" "$OUT/samples" "$OUT/logs"
mkdir -p "$OUT/runs" "$OUT/samples" "$OUT/logs"

# t2v_tiny as `make train` runs it, quiet but with the progress bar's rate postfix on
TRAIN=("$PY" -m trainer.train experiment=t2v_tiny trainer.device=$DEVICE
       trainer.wandb.mode=disabled trainer.val_every=1000 trainer.sample_every=1000
       ${TINY[@]+"${TINY[@]}"})  # (an empty array trips set -u before bash 4.4)
FAILURES=()
declare -A PART_SECONDS

# run_part NAME CMD...: CMD's stdout goes to $OUT/logs/NAME.out, its stderr to NAME.err;
# a failure is recorded (with stderr's tail) and the script goes on to the summary.
run_part() {
    local name=$1; shift
    local began=$SECONDS
    echo "[gpu_smoke] $name ..." >&2
    if ! "$@" > "$OUT/logs/$name.out" 2> "$OUT/logs/$name.err"; then
        FAILURES+=("$name: non-zero exit status, see $OUT/logs/$name.err")
        tail -n 20 "$OUT/logs/$name.err" >&2
    fi
    PART_SECONDS[$name]=$((SECONDS - began))
}

# loss_stats RUN_DIR: "final-step loss, mean of the last 10 steps' losses" from metrics.jsonl
loss_stats() {
    "$PY" - "$1/metrics.jsonl" <<'EOF'
import json, sys
losses = [r["loss"] for r in map(json.loads, open(sys.argv[1])) if r["kind"] == "train"]
print(f"{losses[-1]:.5f} {sum(losses[-10:]) / len(losses[-10:]):.5f}")
EOF
}

# steps_per_s LOG: the last steps/s the progress bar (stderr) showed: the trainer's last
# log window, so start-up and compilation are not in it
steps_per_s() {
    grep -o 'steps_s=[0-9.]*' "$1" | tail -n 1 | cut -d= -f2 || true
}

began_all=$SECONDS

# 1, 2: the same run (seed, data, noise draws) in fp32 and in bf16 + compile + AC; the
# fp32 reference without TF32 (on by default on CUDA), so it is fp32 throughout
run_part tiny_fp32 "${TRAIN[@]}" trainer.max_steps=$STEPS trainer.ckpt_every=$STEPS \
    trainer.precision=fp32 trainer.tf32=false hydra.run.dir="$OUT/runs/tiny_fp32"
run_part tiny_bf16 "${TRAIN[@]}" trainer.max_steps=$STEPS trainer.ckpt_every=$STEPS \
    trainer.precision=bf16 parallel.compile=true parallel.activation_checkpointing=full \
    hydra.run.dir="$OUT/runs/tiny_bf16"

# 3: the second command is the first with more steps; the trainer prints
# "resumed from <checkpoint> (step N)" when it picks the run up
RESUME=("${TRAIN[@]}" trainer.ckpt_every=$RESUME_AT hydra.run.dir="$OUT/runs/resume")
run_part resume_first "${RESUME[@]}" trainer.max_steps=$RESUME_AT
run_part resume_second "${RESUME[@]}" trainer.max_steps=$((RESUME_AT + RESUME_MORE))

# 4
run_part sample_cli "$PY" -m trainer.sample checkpoint="$OUT/runs/resume" \
    prompt="a red square moving left slowly" steps=$SAMPLE_STEPS device=$DEVICE \
    output_dir="$OUT/samples"

# 5, 6: markdown tables on stdout, progress on stderr
run_part step_bench "$PY" bench/step.py "${STEP_BENCH[@]}"
run_part attention_bench "$PY" bench/ring_kernel.py "${ATTENTION_BENCH[@]}"

# ---------------------------------------------------------------- checks and summary

loss_row() {  # loss_row NAME LABEL: a row of the tiny-run table
    local run="$OUT/runs/$1"
    if ! read -r final mean10 < <(loss_stats "$run" 2> /dev/null); then
        final=- mean10=-
    fi
    echo "| $2 | $final | $mean10 | $(steps_per_s "$OUT/logs/$1.err") | ${PART_SECONDS[$1]} |"
}

FP32_ROW=$(loss_row tiny_fp32 "fp32")
BF16_ROW=$(loss_row tiny_bf16 "bf16 + compile + AC full")
# the mean of the last 10 steps: one step's loss swings with its noise level t
LOSS_CHECK=$("$PY" - "$OUT/runs/tiny_fp32/metrics.jsonl" "$OUT/runs/tiny_bf16/metrics.jsonl" \
    <<'EOF' || true
import json, sys
means = []
for path in sys.argv[1:]:
    losses = [r["loss"] for r in map(json.loads, open(path)) if r["kind"] == "train"]
    means.append(sum(losses[-10:]) / len(losses[-10:]))
diff = means[1] - means[0]
verdict = "ok" if abs(diff) <= 0.05 * means[0] else "DIFFERS by more than 5%"
print(f"bf16 - fp32 (mean of last 10): {diff:+.2e} ({diff / means[0]:+.3%}): {verdict}")
EOF
)
[[ $LOSS_CHECK == *": ok" ]] || FAILURES+=("losses: ${LOSS_CHECK:-metrics missing}")

RESUME_LINE=$(grep -m1 "^resumed from .*(step $RESUME_AT)" "$OUT/logs/resume_second.out" || true)
LAST_STEP=$(grep -c '"kind": "train"' "$OUT/runs/resume/metrics.jsonl" 2>/dev/null || true)
if [[ -n $RESUME_LINE && $LAST_STEP == $((RESUME_AT + RESUME_MORE)) ]]; then
    RESUME_CHECK="ok: \`$RESUME_LINE\`, then steps $((RESUME_AT + 1))-$((RESUME_AT + RESUME_MORE))"
else
    RESUME_CHECK="FAILED: no 'resumed from ... (step $RESUME_AT)' line or $LAST_STEP train steps"
    FAILURES+=("resume: $RESUME_CHECK")
fi

MP4=$(find "$OUT/samples" -name '*.mp4' -size +0 | head -n 1)
if [[ -n $MP4 ]]; then
    SAMPLE_CHECK="ok: $MP4 ($(stat -c %s "$MP4") bytes)"
else
    SAMPLE_CHECK="FAILED: no mp4 under $OUT/samples"
    FAILURES+=("sample CLI: $SAMPLE_CHECK")
fi

cat <<EOF

# GPU smoke summary ($( [[ $DRY_RUN == 1 ]] && echo "CPU DRY RUN, tiny sizes" || "$PY" -c \
    'import torch; print(torch.cuda.get_device_name())'))

torch $("$PY" -c 'import torch; print(torch.__version__)'), device $DEVICE, outputs in $OUT

## Tiny t2v runs, $STEPS steps each (same seed and data)

| run | final loss | mean of last 10 (all if fewer) | steps/s (last log window) | wall s (incl. start-up) |
|---|---:|---:|---:|---:|
$FP32_ROW
$BF16_ROW

$LOSS_CHECK

## Resume and sampling

- resume ($RESUME_AT steps, then to $((RESUME_AT + RESUME_MORE))): $RESUME_CHECK
- sample CLI ($SAMPLE_STEPS steps): $SAMPLE_CHECK

## Step bench (bench/step.py ${STEP_BENCH[*]})

$(cat "$OUT/logs/step_bench.out")

## Attention kernels vs SDPA (bench/ring_kernel.py ${ATTENTION_BENCH[*]})

$(cat "$OUT/logs/attention_bench.out")

## Time

$(for part in tiny_fp32 tiny_bf16 resume_first resume_second sample_cli step_bench \
    attention_bench; do echo "- $part: ${PART_SECONDS[$part]} s"; done)
- total: $((SECONDS - began_all)) s (budget on one H100: 480 s)
EOF

if (( ${#FAILURES[@]} )); then
    echo; echo "## Failures"; printf -- '- %s\n' "${FAILURES[@]}"
    exit 1
fi
