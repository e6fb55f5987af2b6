#!/usr/bin/env bash
# Train the embedded pair on a lent GPU in one command, measure it, and leave it in $OUT.
#
# Here first (CPU, about 30 s under the lock) build the corpus pack the GPU trains on, so
# both machines see the same bytes (the GPU machine's Python and packages differ):
#     flock /tmp/heavy.lock python scripts/train_pair.py --stage corpus
# Then, through the device tool (the pack is ignored by git, so it is carried):
#     run(command="bash scripts/gpu_pair.sh", carry=["runs/pair-corpus"], timeout_s=600)
# The target trains for at most PAIR_TARGET_MIN minutes and the draft PAIR_DRAFT_MIN
# (token counts cut to fit at the measured pace; TRAINING.json records what ran), so the
# whole command ends in about 8 minutes on an H200. Back here:
#     cat /work/.device/.../pair.tar.part-* | tar -x -C specserve_ray/assets/tiny-pair
#     python scripts/measure_pair.py --corpus runs/pair-corpus/corpus.jsonl.xz   # CPU step costs
set -uo pipefail
OUT=${OUT:-/tmp/gpu_pair_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/kernels PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
PAIR=${PAIR_DIR:-/tmp/pair-next}
rm -rf "$PAIR" /tmp/pair-work
CORPUS=runs/pair-corpus/corpus.jsonl.xz
[ -f "$CORPUS" ] || { echo "missing $CORPUS: build it here and carry runs/pair-corpus" | tee "$OUT/train.log"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$OUT/train.log"
${PYTHON:-python3} -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/train.log"

# PAIR_DEVICE=cpu PAIR_PRESET=smoke PYTHON=... run the same plumbing here in seconds.
DEVICE=${PAIR_DEVICE:-cuda}
PY=${PYTHON:-python3}
$PY scripts/train_pair.py --preset "${PAIR_PRESET:-gpu}" --device "$DEVICE" --precision bf16 --out "$PAIR" --work /tmp/pair-work \
  --corpus "$CORPUS" --target-fit-minutes "${PAIR_TARGET_MIN:-3.5}" --draft-fit-minutes "${PAIR_DRAFT_MIN:-1.5}" \
  2>&1 | tee -a "$OUT/train.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then
  $PY scripts/measure_pair.py --pair "$PAIR" --device "$DEVICE" --no-step-costs --corpus "$CORPUS" \
    2>&1 | tee "$OUT/measure.log"
  # Files come back at most 16 MiB each, 8 in all: the pair travels as one split tar.
  tar -C "$PAIR" -cf - target draft TRAINING.json | split -b 15M - "$OUT/pair.tar.part-"
fi
cp "$PAIR/TRAINING.json" "$OUT/" 2>/dev/null
ls -la "$OUT"
exit "$rc"
