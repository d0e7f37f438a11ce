"""Frozen configuration of a training run, built in one place and logged with the run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from features.errors import ConfigError


@dataclass(frozen=True)
class ModelParams:
    """Keyword arguments of :class:`recommender.model.PlanOutcomeModel`."""

    lambda_ae: float = 2.0
    interval_level: float = 0.8
    use_prior: bool = True
    orthogonalize: bool = True
    n_folds: int = 2
    validation_fraction: float = 0.2
    learning_rate: float = 0.1
    num_leaves: int = 7
    min_data_in_leaf: int = 40
    lambda_l2: float = 10.0
    max_rounds: int = 400
    tree_gain_se: float = 1.0
    n_jobs: int = 2


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on besides the data bytes themselves."""

    data: str
    truth: str | None = None  # simulator truth file (patients beside it as <stem>_patients)
    experiment: str = "painplan"
    model_name: str = "painplan"
    split: Literal["group", "temporal"] = "group"
    test_fraction: float = 0.2
    seed: int = 0
    min_episodes: int = 100
    guideline_profile: Literal["US_ACP_CDC", "UK_NICE"] = "US_ACP_CDC"
    promote: bool = False
    model: ModelParams = field(default_factory=ModelParams)

    def __post_init__(self):
        if not 0.05 <= self.test_fraction <= 0.5:
            raise ConfigError(f"test_fraction must be between 0.05 and 0.5, got {self.test_fraction}")
        if self.split not in ("group", "temporal"):
            raise ConfigError(f"split must be 'group' or 'temporal', got {self.split!r}")
        if self.model.lambda_ae < 0:
            raise ConfigError(f"model.lambda_ae must be >= 0, got {self.model.lambda_ae}")
        if not 0.5 <= self.model.interval_level < 1:
            raise ConfigError(f"model.interval_level must be in [0.5, 1), got {self.model.interval_level}")

    @classmethod
    def from_file(cls, path: str | Path | None, **overrides) -> TrainConfig:
        """Read a YAML config (optional) and apply non-None keyword overrides on top."""
        raw: dict = {}
        if path is not None:
            path = Path(path)
            if not path.exists():
                raise ConfigError(f"config file {path} does not exist; check the path")
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
            if not isinstance(raw, dict):
                raise ConfigError(f"config file {path} must hold a mapping of settings")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        model_raw = raw.pop("model", {}) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        known_model = {f.name for f in dataclasses.fields(ModelParams)}
        unknown += [f"model.{k}" for k in sorted(set(model_raw) - known_model)]
        if unknown:
            raise ConfigError(f"unknown config setting(s) {', '.join(unknown)}; known settings: "
                              f"{', '.join(sorted(known - {'model'}))}, and model.<"
                              f"{'|'.join(sorted(known_model))}>")
        try:
            return cls(model=ModelParams(**model_raw), **raw)
        except TypeError as err:
            raise ConfigError(f"invalid config: {err}") from err

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
