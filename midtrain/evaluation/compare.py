"""A model against a baseline, per source: domain gain on customer sources, forgetting on curated.

Both are differences in held-out loss (nats per token) on the same windows, signed so that a
positive number is what its name says:

    domain gain = baseline loss - model loss     (customer sources; > 0: better on the domain)
    forgetting  = model loss - baseline loss     (curated sources; > 0: worse on general text)

A source of no kind (``--data PREFIX``) gets only the change in loss. The perplexity ratio is
``exp(model loss - baseline loss)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from midtrain.evaluation.perplexity import SourceScore, exp_or_inf

METRIC_BY_KIND = {"customer": "domain gain", "curated": "forgetting"}


@dataclass
class SourceChange:
    name: str
    kind: str | None
    baseline_loss: float
    model_loss: float

    @property
    def delta_loss(self) -> float:
        """Model loss - baseline loss (nats/token); negative: the model is better."""
        return self.model_loss - self.baseline_loss

    @property
    def metric(self) -> str:
        return METRIC_BY_KIND.get(self.kind or "", "change in loss")

    @property
    def value(self) -> float:
        """The metric, signed so that positive means what it names."""
        return -self.delta_loss if self.kind == "customer" else self.delta_loss

    @property
    def perplexity_change_pct(self) -> float:
        return 100.0 * (exp_or_inf(self.delta_loss) - 1.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "metric": self.metric,
            "value": self.value,
            "baseline_loss": self.baseline_loss,
            "model_loss": self.model_loss,
            "delta_loss": self.delta_loss,
            "perplexity_change_pct": self.perplexity_change_pct,
        }


@dataclass
class Comparison:
    changes: dict[str, SourceChange]

    def _mean(self, kind: str) -> float | None:
        values = [c.value for c in self.changes.values() if c.kind == kind]
        return sum(values) / len(values) if values else None

    @property
    def domain_gain(self) -> float | None:
        """Mean domain gain over customer sources (None without any)."""
        return self._mean("customer")

    @property
    def forgetting(self) -> float | None:
        """Mean forgetting over curated sources (None without any)."""
        return self._mean("curated")

    def to_json(self) -> dict[str, Any]:
        return {
            "domain_gain": self.domain_gain,
            "forgetting": self.forgetting,
            "sources": {name: c.to_json() for name, c in self.changes.items()},
        }


def compare(model: dict[str, SourceScore], baseline: dict[str, SourceScore]) -> Comparison:
    """Per-source changes for the sources both were scored on (the same evaluation set)."""
    return Comparison(
        {
            name: SourceChange(name, score.kind, baseline[name].loss, score.loss)
            for name, score in model.items()
            if name in baseline
        }
    )
