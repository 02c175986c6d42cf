"""Rebuild legal_continuation.{yaml,jsonl} from the demo's held-out legal documents.

    examples/prepare_sample_data.sh data       # the demo's corpora, with 5% held out
    python examples/tasks/make_legal_continuation.py data

Built from the held-out split only, so no item was seen in training.
"""

import sys
from pathlib import Path

from midtrain.data_mixing.tokenizer import load_tokenizer
from midtrain.evaluation.downstream import build_continuation_task, heldout_texts

data = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
texts = heldout_texts(data / "legal", load_tokenizer(data / "tok"))
print(
    build_continuation_task(
        texts,
        Path(__file__).parent,
        "legal_continuation",
        items=100,
        context_words=24,
        continuation_words=10,
    )
)
