"""The simulator's parameters: one documented YAML file, loaded into a frozen, checked config.

Every number the cohort simulator uses lives in ``training/configs/simulator.yaml`` with a
comment citing ``clinical-evidence.md`` (section and row) or marking it ``A:`` (assumption).
:class:`SimulatorConfig` mirrors the file section by section: a misspelt, missing or unknown
key is a :class:`~features.errors.ConfigError` naming it, not a silent default. The arrays the
structural equations index into (effects by condition × component, habits, AE multipliers …)
are derived once per config by :meth:`SimulatorConfig.tables`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import yaml

from features.catalog import COMPONENT_CODES, COMPONENT_INDEX, DRUG, plan_matrix
from features.errors import ConfigError
from features.schema import PAIN_CONDITIONS, PRIOR_LEVELS, RISK_FLAGS

N_COMPONENTS = len(COMPONENT_CODES)
# Found next to this module rather than via importlib.resources.files("training"): under pytest
# a tests/training folder can shadow the package name, while this path holds for editable and
# wheel installs alike (pyproject ships training/configs/*.yaml as package data).
PACKAGED_CONFIG = Path(__file__).resolve().parent / "configs" / "simulator.yaml"

# Names a risk-flag logit may use besides the flags drawn before it (built in simulate.py).
RISK_PREDICTORS = frozenset(
    {
        "intercept",
        "age10",
        "bmi5",
        "phq9_5",
        "depression",
        "anxiety",
        "heavy_alcohol",
        "smoker",
        "male",
        "neuropathic_condition",
        "headache_condition",
    }
)
# Patient conditions an AE multiplier may depend on (true state, not the extract).
AE_CONDITIONS = frozenset({"age65", "egfr_lt30", "egfr_lt60", *RISK_FLAGS})
# Patient conditions a clinician's soft rule may depend on (observed columns only).
POLICY_CONDITIONS = frozenset(
    {"age65", "depression", "insomnia", "oa_obese", "smoker", *RISK_FLAGS}
)
MISSING_CONSTANT = (
    "pcs",
    "isi",
    "smoker",
    "activity_min_week",
    "alcohol_units_week",
    "diet_quality",
    "neuropathic_component",
)
MISSING_BY_AGE = ("bmi", "egfr")


def _freeze(value: Any) -> Any:
    """Deep read-only copy: dicts → MappingProxyType, lists → tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class _Section:
    """Build a section dataclass from its YAML mapping, naming missing and unknown keys."""

    @classmethod
    def from_mapping(cls, raw: Any, where: str):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        missing = [n for n in names if n not in raw]
        unknown = [k for k in raw if k not in names]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing key(s) {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown key(s) {', '.join(map(str, unknown))}")
            raise ConfigError(
                f"{where}: {'; '.join(parts)}; compare with the packaged "
                "training/configs/simulator.yaml"
            )
        return cls(**{n: _freeze(raw[n]) for n in names})


@dataclass(frozen=True)
class CohortParams(_Section):
    condition_mix: Mapping[str, float]
    age_mean_sd: Mapping[str, tuple[float, float]]
    age_min: int
    age_max: int
    female_share: Mapping[str, float]
    sex_other_share: float
    sex_unknown_share: float
    neuropathic_component_prob: Mapping[str, float]
    duration_median_months: float
    duration_log_sd: float
    duration_min: float
    duration_max: float


@dataclass(frozen=True)
class DistressParams(_Section):
    condition_shift: Mapping[str, float]
    age_slope_per_decade: float
    female_shift: float


@dataclass(frozen=True)
class QuestionnaireParams(_Section):
    phq9: Mapping[str, float]
    gad7: Mapping[str, float]
    pcs: Mapping[str, float]
    isi: Mapping[str, float]
    pain: Mapping[str, float]
    peg_interference_offset: float
    peg_interference_distress: float
    peg_interference_noise_sd: float


@dataclass(frozen=True)
class LifestyleParams(_Section):
    smoker_prob: Mapping[str, float]
    smoker_distress_logit: float
    smoker_age_logit_per_decade: float
    bmi_mean: float
    bmi_condition_shift: Mapping[str, float]
    bmi_log_sd: float
    bmi_min: float
    bmi_max: float
    egfr_at_40: float
    egfr_decline_per_year_after_40: float
    egfr_neuropathic_shift: float
    egfr_sd: float
    egfr_min: float
    egfr_max: float
    activity_zero_prob: float
    activity_median: float
    activity_log_sd: float
    activity_pain_log_slope: float
    alcohol_zero_prob: float
    alcohol_median: float
    alcohol_log_sd: float
    alcohol_male_factor: float
    heavy_alcohol_units: float
    diet_mean: float
    diet_sd: float
    diet_distress_slope: float


@dataclass(frozen=True)
class ResponsivenessParams(_Section):
    global_loading: float
    groups: Mapping[str, Mapping[str, Any]]
    heterogeneity_ratio: float
    ae_susceptibility_shared: float
    ae_susceptibility_sd: float


@dataclass(frozen=True)
class PriorHistoryParams(_Section):
    tried_prob: Mapping[str, tuple[float, ...]]
    duration_exponent: float
    duration_factor_min: float
    duration_factor_max: float
    outcome_noise_sd: float
    responded_threshold: float
    partial_threshold: float
    intolerance_scale: float


@dataclass(frozen=True)
class EffectParams(_Section):
    by_column: Mapping[str, tuple[float, ...]]
    condition_column: Mapping[str, str]


@dataclass(frozen=True)
class ModifierParams(_Section):
    severity_reference_peg: float
    severity_scale_min: float
    severity_scale_max: float
    prior_no_response_factor: float
    assumed: Mapping[str, float]


@dataclass(frozen=True)
class CombinationParams(_Section):
    factor_two: float
    factor_three_plus: float


@dataclass(frozen=True)
class AdherenceParams(_Section):
    per_extra_component: float
    depression: float
    minimum: float


@dataclass(frozen=True)
class NaturalHistoryParams(_Section):
    usual_care_intercept: float
    regression_to_mean: float
    reference_peg: float
    pcs_high: float
    pcs_threshold: float
    depression: float
    insomnia: float
    insomnia_threshold: float
    smoker: float
    expectation: float
    noise_sd: float


@dataclass(frozen=True)
class AdverseEventParams(_Section):
    base: Mapping[str, float]
    component_cap: float
    plan_cap: float
    risk_multipliers: tuple[Mapping[str, Any], ...]
    prior_intolerant_factor: float
    interactions: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class PolicyParams(_Section):
    habit: Mapping[str, tuple[float, ...]]
    size_preference: tuple[float, ...]
    prior_utility: Mapping[str, float]
    severity_weights: Mapping[str, float]
    severity_reference: Mapping[str, tuple[float, float]]
    severity_component_slope: tuple[float, ...]
    severity_size_slope: float
    obesity_bmi: float
    soft_rules: tuple[Mapping[str, Any], ...]
    confounding: float
    floor_violation_rate: float


@dataclass(frozen=True)
class RepeatParams(_Section):
    second_episode_fraction: float
    gap_days_min: int
    gap_days_max: int
    episode_days: int
    responder_fraction: float
    partial_fraction: float
    pain_tracks_peg: float


@dataclass(frozen=True)
class DateParams(_Section):
    first_start: str
    last_start: str


@dataclass(frozen=True)
class TruthParams(_Section):
    lambda_ae: float
    posterior_draws: int


@dataclass(frozen=True)
class RuntimeParams(_Section):
    chunk_rows: int
    progress_min_rows: int
    progress_min_truth_patients: int


_SECTIONS: dict[str, type[_Section]] = {
    "cohort": CohortParams,
    "distress": DistressParams,
    "questionnaires": QuestionnaireParams,
    "lifestyle": LifestyleParams,
    "responsiveness": ResponsivenessParams,
    "prior_history": PriorHistoryParams,
    "effects": EffectParams,
    "modifiers": ModifierParams,
    "combination": CombinationParams,
    "adherence": AdherenceParams,
    "natural_history": NaturalHistoryParams,
    "adverse_events": AdverseEventParams,
    "policy": PolicyParams,
    "repeat_episodes": RepeatParams,
    "dates": DateParams,
    "truth": TruthParams,
    "runtime": RuntimeParams,
}


@dataclass(frozen=True)
class SimulatorConfig:
    """All parameters of the structural causal model behind the synthetic cohort.

    Build it with :meth:`from_yaml` (the packaged file by default) and change the knobs the CLI
    exposes with :meth:`with_overrides`; the config is immutable and compared by value.
    """

    cohort: CohortParams
    distress: DistressParams
    questionnaires: QuestionnaireParams
    lifestyle: LifestyleParams
    risk_flags: Mapping[str, Mapping[str, float]]
    missingness: Mapping[str, Any]
    responsiveness: ResponsivenessParams
    prior_history: PriorHistoryParams
    effects: EffectParams
    modifiers: ModifierParams
    assumed_modifiers: bool
    combination: CombinationParams
    adherence: AdherenceParams
    natural_history: NaturalHistoryParams
    adverse_events: AdverseEventParams
    policy: PolicyParams
    repeat_episodes: RepeatParams
    dates: DateParams
    truth: TruthParams
    runtime: RuntimeParams
    version: int = 1
    source: str = "<packaged>"

    @classmethod
    def from_yaml(cls, path: str | Path | None = None) -> SimulatorConfig:
        """Load and check a simulator config; ``None`` loads the packaged default."""
        if path is None:
            text, source = (
                PACKAGED_CONFIG.read_text(encoding="utf-8"),
                "training/configs/simulator.yaml",
            )
        else:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(
                    f"simulator config {p}: no such file; pass a YAML file shaped like "
                    "the packaged training/configs/simulator.yaml, or omit --config"
                )
            text, source = p.read_text(encoding="utf-8"), str(p)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"simulator config {source}: not valid YAML ({err}); fix the syntax"
            ) from err
        return cls.from_mapping(raw, source=source)

    @classmethod
    def from_mapping(cls, raw: Any, *, source: str = "<mapping>") -> SimulatorConfig:
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"simulator config {source}: expected a YAML mapping at the top level"
            )
        expected = set(_SECTIONS) | {"risk_flags", "missingness", "assumed_modifiers", "version"}
        missing = sorted(expected - set(raw))
        unknown = sorted(set(map(str, raw)) - expected)
        if missing or unknown:
            raise ConfigError(
                f"simulator config {source}: "
                + "; ".join(
                    ([f"missing section(s) {', '.join(missing)}"] if missing else [])
                    + ([f"unknown section(s) {', '.join(unknown)}"] if unknown else [])
                )
                + "; compare with the packaged training/configs/simulator.yaml"
            )
        kwargs: dict[str, Any] = {
            name: kind.from_mapping(raw[name], f"simulator config {source}: {name}")
            for name, kind in _SECTIONS.items()
        }
        config = cls(
            **kwargs,
            risk_flags=_freeze(raw["risk_flags"]),
            missingness=_freeze(raw["missingness"]),
            assumed_modifiers=raw["assumed_modifiers"],
            version=raw["version"],
            source=source,
        )
        config.check()
        return config

    def with_overrides(
        self,
        *,
        confounding: float | None = None,
        floor_violation_rate: float | None = None,
        assumed_modifiers: bool | None = None,
    ) -> SimulatorConfig:
        """A copy with the CLI-exposed knobs changed (``None`` keeps the current value)."""
        policy = self.policy
        if confounding is not None:
            policy = dataclasses.replace(policy, confounding=float(confounding))
        if floor_violation_rate is not None:
            policy = dataclasses.replace(policy, floor_violation_rate=float(floor_violation_rate))
        new = dataclasses.replace(
            self,
            policy=policy,
            assumed_modifiers=self.assumed_modifiers
            if assumed_modifiers is None
            else bool(assumed_modifiers),
        )
        new.check()
        return new

    # --- checks -------------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent setting."""
        where = f"simulator config {self.source}"
        conditions = set(PAIN_CONDITIONS)

        def by_condition(name: str, table: Mapping[str, Any], length: int | None = None) -> None:
            keys = set(table)
            if keys != conditions:
                raise ConfigError(
                    f"{where}: {name} must have one entry per pain condition "
                    f"({', '.join(PAIN_CONDITIONS)}); missing {sorted(conditions - keys)}, "
                    f"unknown {sorted(keys - conditions)}"
                )
            if length is not None:
                bad = [k for k, v in table.items() if len(v) != length]
                if bad:
                    raise ConfigError(f"{where}: {name} rows {bad} must have {length} values")

        def probability(name: str, value: Any) -> None:
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not 0 <= value <= 1
            ):
                raise ConfigError(
                    f"{where}: {name} = {value!r} must be a probability between 0 and 1"
                )

        def components(name: str, codes: Any) -> None:
            unknown = [c for c in codes if c not in COMPONENT_INDEX]
            if unknown:
                raise ConfigError(
                    f"{where}: {name} names unknown component(s) {unknown}; "
                    f"known codes are {', '.join(COMPONENT_CODES)}"
                )

        c = self.cohort
        for name in ("condition_mix", "age_mean_sd", "female_share", "neuropathic_component_prob"):
            by_condition(f"cohort.{name}", getattr(c, name), 2 if name == "age_mean_sd" else None)
        if not math.isclose(sum(c.condition_mix.values()), 1.0, abs_tol=1e-6):
            raise ConfigError(
                f"{where}: cohort.condition_mix sums to {sum(c.condition_mix.values()):g}; "
                "the shares must sum to 1"
            )
        for k, v in {**c.condition_mix, **c.female_share, **c.neuropathic_component_prob}.items():
            probability(f"cohort share for {k}", v)
        by_condition("distress.condition_shift", self.distress.condition_shift)
        by_condition("lifestyle.smoker_prob", self.lifestyle.smoker_prob)
        by_condition("lifestyle.bmi_condition_shift", self.lifestyle.bmi_condition_shift)
        by_condition("prior_history.tried_prob", self.prior_history.tried_prob, N_COMPONENTS)
        by_condition("effects.condition_column", self.effects.condition_column)
        by_condition("policy.habit", self.policy.habit, N_COMPONENTS)
        for q in ("phq9", "gad7", "pcs", "isi", "pain"):
            spec = getattr(self.questionnaires, q)
            if set(spec) != {"mean", "sd", "loading"} or not 0 <= spec["loading"] < 1:
                raise ConfigError(
                    f"{where}: questionnaires.{q} needs mean, sd and a loading in [0, 1)"
                )

        cols = self.effects.by_column
        if "lbp_radicular" not in cols:
            raise ConfigError(f"{where}: effects.by_column needs an 'lbp_radicular' row (§3.3)")
        bad = [k for k, v in cols.items() if len(v) != N_COMPONENTS]
        if bad:
            raise ConfigError(
                f"{where}: effects.by_column rows {bad} must have {N_COMPONENTS} values"
            )
        bad = sorted({v for v in self.effects.condition_column.values() if v not in cols})
        if bad:
            raise ConfigError(f"{where}: effects.condition_column uses unknown column(s) {bad}")

        flags = list(self.risk_flags)
        if set(flags) != set(RISK_FLAGS):
            raise ConfigError(
                f"{where}: risk_flags must list every contract risk flag once; missing "
                f"{sorted(set(RISK_FLAGS) - set(flags))}, unknown {sorted(set(flags) - set(RISK_FLAGS))}"
            )
        for i, flag in enumerate(flags):
            allowed = RISK_PREDICTORS | set(flags[:i])
            unknown = sorted(set(self.risk_flags[flag]) - allowed)
            if unknown or "intercept" not in self.risk_flags[flag]:
                raise ConfigError(
                    f"{where}: risk_flags.{flag} needs an intercept and may only use "
                    f"{', '.join(sorted(allowed))}; got {unknown or 'no intercept'}"
                )

        for k in MISSING_CONSTANT:
            probability(f"missingness.{k}", self.missingness.get(k))
        for k in MISSING_BY_AGE:
            spec = self.missingness.get(k)
            if not isinstance(spec, Mapping) or set(spec) != {"intercept", "age10"}:
                raise ConfigError(
                    f"{where}: missingness.{k} needs intercept and age10 (logistic in age)"
                )
        extra = set(self.missingness) - set(MISSING_CONSTANT) - set(MISSING_BY_AGE)
        if extra:
            raise ConfigError(f"{where}: missingness has unknown column(s) {sorted(extra)}")

        r = self.responsiveness
        seen: list[str] = []
        for name, group in r.groups.items():
            components(f"responsiveness.groups.{name}", group["components"])
            seen += list(group["components"])
            if r.global_loading**2 + group["loading"] ** 2 >= 1:
                raise ConfigError(
                    f"{where}: responsiveness loadings of group {name} leave no own "
                    "variance (global² + group² must be < 1)"
                )
        if sorted(seen) != sorted(COMPONENT_CODES):
            raise ConfigError(
                f"{where}: responsiveness.groups must put each component in exactly one group"
            )

        ae = self.adverse_events
        if set(ae.base) != set(COMPONENT_CODES):
            raise ConfigError(f"{where}: adverse_events.base needs one probability per component")
        for k, v in ae.base.items():
            probability(f"adverse_events.base.{k}", v)
        for rule in ae.risk_multipliers:
            if rule.get("when") not in AE_CONDITIONS:
                raise ConfigError(
                    f"{where}: adverse_events.risk_multipliers 'when' = {rule.get('when')!r} "
                    f"is not one of {', '.join(sorted(AE_CONDITIONS))}"
                )
            components("adverse_events.risk_multipliers", rule["components"])
            if rule["factor"] <= 0:
                raise ConfigError(f"{where}: AE multiplier factors must be positive")
        for rule in ae.interactions:
            components("adverse_events.interactions", rule["pair"])
        probability("adverse_events.plan_cap", ae.plan_cap)
        if ae.plan_cap >= 1:
            raise ConfigError(f"{where}: adverse_events.plan_cap must stay below 1")

        pol = self.policy
        if len(pol.size_preference) != 5:
            raise ConfigError(f"{where}: policy.size_preference needs 5 values (plan sizes 1–5)")
        if len(pol.severity_component_slope) != N_COMPONENTS:
            raise ConfigError(
                f"{where}: policy.severity_component_slope needs {N_COMPONENTS} values"
            )
        if set(pol.prior_utility) != set(PRIOR_LEVELS) - {"none"}:
            raise ConfigError(f"{where}: policy.prior_utility needs {', '.join(PRIOR_LEVELS[1:])}")
        for rule in pol.soft_rules:
            if rule.get("when") not in POLICY_CONDITIONS:
                raise ConfigError(
                    f"{where}: policy.soft_rules 'when' = {rule.get('when')!r} is not one "
                    f"of {', '.join(sorted(POLICY_CONDITIONS))}"
                )
            components("policy.soft_rules", rule["components"])
        if not isinstance(pol.confounding, (int, float)) or pol.confounding < 0:
            raise ConfigError(
                f"{where}: policy.confounding (--confounding) = {pol.confounding!r} must be a number ≥ 0 "
                "(0 removes severity confounding, 1 is the default strength)"
            )
        probability(
            "policy.floor_violation_rate (--floor-violation-rate)", pol.floor_violation_rate
        )
        probability(
            "repeat_episodes.second_episode_fraction", self.repeat_episodes.second_episode_fraction
        )
        if not isinstance(self.assumed_modifiers, bool):
            raise ConfigError(f"{where}: assumed_modifiers must be true or false")
        if self.natural_history.noise_sd <= 0:
            raise ConfigError(f"{where}: natural_history.noise_sd must be positive")
        try:
            first = np.datetime64(self.dates.first_start, "D")
            last = np.datetime64(self.dates.last_start, "D")
        except ValueError as err:
            raise ConfigError(f"{where}: dates must be ISO dates (YYYY-MM-DD): {err}") from err
        if last < first:
            raise ConfigError(f"{where}: dates.last_start is before dates.first_start")
        if self.runtime.chunk_rows < 1:
            raise ConfigError(f"{where}: runtime.chunk_rows must be ≥ 1")

    # --- derived arrays ---------------------------------------------------------------------
    @cached_property
    def tables(self) -> SimulatorTables:
        """Numpy views of the parameters, indexed by condition code and component code."""
        return SimulatorTables.build(self)


def _by_condition(table: Mapping[str, Any]) -> np.ndarray:
    return np.asarray([table[c] for c in PAIN_CONDITIONS], dtype=float)


def _component_mask(codes: Any) -> np.ndarray:
    mask = np.zeros(N_COMPONENTS, dtype=bool)
    mask[[COMPONENT_INDEX[c] for c in codes]] = True
    return mask


@dataclass(frozen=True)
class SimulatorTables:
    """Arrays over conditions (rows in ``PAIN_CONDITIONS`` order) and components (``COMPONENT_CODES``)."""

    condition_mix: np.ndarray  # (7,)
    age_mean_sd: np.ndarray  # (7, 2)
    female_share: np.ndarray  # (7,)
    neuropathic_prob: np.ndarray  # (7,)
    distress_shift: np.ndarray  # (7,)
    smoker_prob: np.ndarray  # (7,)
    bmi_shift: np.ndarray  # (7,)
    tried_prob: np.ndarray  # (7, 12)
    benefit: np.ndarray  # (7, 12) PEG-point benefit, from §3.3 (sign flipped)
    benefit_radicular: np.ndarray  # (12,) LBP-radicular column
    global_loading: float
    group_loading: np.ndarray  # (12,)
    group_id: np.ndarray  # (12,) int
    n_groups: int
    is_drug: np.ndarray  # (12,) bool
    ae_base: np.ndarray  # (12,)
    ae_rules: tuple[tuple[str, np.ndarray, float], ...]  # (condition, component mask, log factor)
    plan_interaction_log: np.ndarray  # (839,) log of the §5.3 interaction factor per plan
    interaction_pairs: np.ndarray  # (n_pairs, 2) component indices
    interaction_log: np.ndarray  # (n_pairs,)
    habit: np.ndarray  # (7, 12)
    size_preference: np.ndarray  # (6,) index = plan size; size 0 unused
    prior_utility: np.ndarray  # (5,) by PRIOR_LEVELS code
    severity_slope: np.ndarray  # (12,)
    soft_rules: tuple[tuple[str, np.ndarray, float], ...]
    plans: np.ndarray  # (839, 12) float 0/1
    plan_size: np.ndarray  # (839,)

    @classmethod
    def build(cls, cfg: SimulatorConfig) -> SimulatorTables:
        eff = cfg.effects
        benefit = -np.asarray([eff.by_column[eff.condition_column[c]] for c in PAIN_CONDITIONS])
        r = cfg.responsiveness
        group_loading = np.zeros(N_COMPONENTS)
        group_id = np.zeros(N_COMPONENTS, dtype=int)
        for g, group in enumerate(r.groups.values()):
            idx = [COMPONENT_INDEX[c] for c in group["components"]]
            group_loading[idx] = group["loading"]
            group_id[idx] = g
        pairs = np.asarray(
            [
                [COMPONENT_INDEX[a] for a in rule["pair"]]
                for rule in cfg.adverse_events.interactions
            ],
            dtype=int,
        ).reshape(-1, 2)
        pair_log = np.log([rule["factor"] for rule in cfg.adverse_events.interactions])
        plans = plan_matrix().astype(float)
        plan_interaction_log = (plans[:, pairs[:, 0]] * plans[:, pairs[:, 1]]) @ pair_log
        prior_utility = np.zeros(len(PRIOR_LEVELS))
        for level, u in cfg.policy.prior_utility.items():
            prior_utility[PRIOR_LEVELS.index(level)] = u
        return cls(
            condition_mix=_by_condition(cfg.cohort.condition_mix),
            age_mean_sd=_by_condition(cfg.cohort.age_mean_sd),
            female_share=_by_condition(cfg.cohort.female_share),
            neuropathic_prob=_by_condition(cfg.cohort.neuropathic_component_prob),
            distress_shift=_by_condition(cfg.distress.condition_shift),
            smoker_prob=_by_condition(cfg.lifestyle.smoker_prob),
            bmi_shift=_by_condition(cfg.lifestyle.bmi_condition_shift),
            tried_prob=_by_condition(cfg.prior_history.tried_prob),
            benefit=benefit,
            benefit_radicular=-np.asarray(eff.by_column["lbp_radicular"], dtype=float),
            global_loading=float(r.global_loading),
            group_loading=group_loading,
            group_id=group_id,
            n_groups=len(r.groups),
            is_drug=_component_mask(DRUG),
            ae_base=np.asarray([cfg.adverse_events.base[c] for c in COMPONENT_CODES], dtype=float),
            ae_rules=tuple(
                (rule["when"], _component_mask(rule["components"]), math.log(rule["factor"]))
                for rule in cfg.adverse_events.risk_multipliers
            ),
            plan_interaction_log=plan_interaction_log,
            interaction_pairs=pairs,
            interaction_log=pair_log,
            habit=_by_condition(cfg.policy.habit),
            size_preference=np.concatenate(
                [[0.0], np.asarray(cfg.policy.size_preference, dtype=float)]
            ),
            prior_utility=prior_utility,
            severity_slope=np.asarray(cfg.policy.severity_component_slope, dtype=float),
            soft_rules=tuple(
                (rule["when"], _component_mask(rule["components"]), float(rule["utility"]))
                for rule in cfg.policy.soft_rules
            ),
            plans=plans,
            plan_size=plans.sum(axis=1),
        )
