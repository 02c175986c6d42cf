"""Evaluation: held-out perplexity per source, domain gain vs. forgetting, reports and plots.

Imports checkpoints, data_mixing and training.metrics (a pure reader) only; never DeepSpeed, Ray
or launch. See docs/evaluation.md.
"""

from midtrain.evaluation.compare import Comparison, SourceChange, compare
from midtrain.evaluation.evaluate import EvalOptions, Evaluation, RunEval, evaluate
from midtrain.evaluation.heldout import DEFAULT_MAX_TOKENS, EvalSet, build_eval_set
from midtrain.evaluation.perplexity import CheckpointScores, SourceScore, score_checkpoint
from midtrain.evaluation.report import check_report_dir, print_summary, write_report

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "CheckpointScores",
    "Comparison",
    "EvalOptions",
    "EvalSet",
    "Evaluation",
    "RunEval",
    "SourceChange",
    "SourceScore",
    "build_eval_set",
    "check_report_dir",
    "compare",
    "evaluate",
    "print_summary",
    "score_checkpoint",
    "write_report",
]
