"""Mixture spec: named sources with token weights, a repetition cap, and optional stages.

Weights are over *tokens* and need not sum to one (they are normalised). A stage covers the part
of the run up to ``until`` (a fraction of the run); a stage without weights uses the sources' own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from midtrain.config_io import AbsPath, Float, Int, StrictModel, load_config

if TYPE_CHECKING:
    from midtrain.data_mixing.sampler import MixtureSampler

SOURCE_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]*$"


class SourceConfig(StrictModel):
    name: str = Field(pattern=SOURCE_NAME)
    kind: Literal["customer", "curated"]
    path: list[AbsPath] = Field(min_length=1, description="one or more prepared prefixes")
    weight: Float = Field(gt=0)
    max_epochs: Float | None = Field(default=None, gt=0, description="repetition cap")

    @field_validator("path", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class StageConfig(StrictModel):
    until: Float = Field(gt=0, le=1, description="end of the stage, as a fraction of the run")
    weights: dict[str, Float] | None = None

    @field_validator("weights")
    @classmethod
    def _positive(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            for name, w in value.items():
                if w <= 0:  # infinite and NaN weights are refused by the type
                    raise ValueError(f"weight of {name!r} must be a positive number, got {w}")
        return value


class MixtureConfig(StrictModel):
    seq_length: Int = Field(gt=0)
    tokens: Int | None = Field(default=None, gt=0, description="length of the run in tokens")
    seed: Int = 0
    sources: list[SourceConfig] = Field(min_length=1)
    stages: list[StageConfig] = Field(default_factory=list)
    # The file this mixture was read from (for error messages); not part of the config.
    _source: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self) -> MixtureConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dupes)}")
        last = 0.0
        for i, stage in enumerate(self.stages):
            if stage.until <= last:
                raise ValueError(
                    f"stages[{i}].until must increase (got {stage.until} after {last})"
                )
            last = stage.until
            if stage.weights is not None:
                unknown = sorted(set(stage.weights) - set(names))
                if unknown:
                    raise ValueError(f"stages[{i}].weights: unknown source {', '.join(unknown)}")
                missing = [n for n in names if n not in stage.weights]
                if missing:
                    raise ValueError(
                        f"stages[{i}].weights: no weight for {', '.join(missing)} "
                        "(give every source a weight)"
                    )
        if self.stages and self.stages[-1].until != 1.0:
            raise ValueError("the last stage must end at until: 1.0")
        return self

    def stage_list(self) -> list[StageConfig]:
        """The stages to run, always at least one, each with explicit weights."""
        own = {s.name: s.weight for s in self.sources}
        stages = self.stages or [StageConfig(until=1.0)]
        return [StageConfig(until=s.until, weights=s.weights or dict(own)) for s in stages]

    @property
    def source_file(self) -> str | None:
        return self._source

    def build(self, total_sequences: int | None = None) -> MixtureSampler:
        """The live sampler: plans the run (every check of `mix plan`) and opens the datasets."""
        from midtrain.data_mixing.sampler import MixtureSampler

        return MixtureSampler(self, total_sequences)


def load_mixture(path: str | Path, overrides: list[str] | None = None) -> MixtureConfig:
    cfg = load_config(MixtureConfig, path, overrides)
    cfg._source = str(path)
    return cfg
