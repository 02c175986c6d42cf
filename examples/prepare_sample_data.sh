#!/usr/bin/env bash
# Prepare the sample corpora the example run specs use, with the same commands you would run on
# your own data: build a tokenizer, then tokenize each corpus into an indexed dataset.
#   usage: examples/prepare_sample_data.sh [DATA_DIR]    (default: data)
set -euo pipefail
DATA=${1:-data}
midtrain data sample-corpora --output "$DATA/raw" --max-chars 1500000
midtrain tokenizer train --input "$DATA/raw/general.jsonl" --input "$DATA/raw/legal.jsonl" \
    --vocab-size 2048 --output "$DATA/tok"
midtrain data prepare --input "$DATA/raw/general.jsonl" --tokenizer "$DATA/tok" \
    --output "$DATA/general" --holdout-fraction 0.05
midtrain data prepare --input "$DATA/raw/legal.jsonl" --tokenizer "$DATA/tok" \
    --output "$DATA/legal" --holdout-fraction 0.05
