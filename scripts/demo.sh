#!/usr/bin/env bash
# The README's main command: install what is missing, then run the paired text/speech evaluation
# of the embedded default model (mini: Whisper tiny.en encoder -> trained adapter -> SmolLM2-135M)
# on the first LIMIT ARC-Easy test questions (text twin, speech twin, and the shuffled-audio control:
# another question's audio), with hidden-state capture, and write the modality-gap report.
# The set and the item count are tasks/_generate.py's DEMO_PAIR and DEMO_LIMIT (a test checks this file).
#   OUT=dir LIMIT=n bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/demo}
LIMIT=${LIMIT:-200}
start=$(date +%s)
lm_eval --model lslm \
  --model_args "pretrained=mini,capture=tokens,capture_dir=$OUT/capture,capture_limit=30" \
  --tasks speech_arc_easy,speech_arc_easy_shuffled --limit "$LIMIT" --batch_size 8 --device cpu \
  --log_samples --output_path "$OUT/results"
lmeval-speech report "$OUT/results" --out "$OUT/report"
echo "demo finished in $(( $(date +%s) - start )) s; report: $OUT/report/report.md, item browser: $OUT/report/report.html"
