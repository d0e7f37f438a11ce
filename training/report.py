"""What a run publishes for people: the model card and the global SHAP summaries.

The model card is built only from the frozen config, the :class:`~training.evaluate.Evaluation`
and the bundle metadata, so it cannot describe a model other than the one logged next to it.

SHAP: the outcome model scores a plan as ``baseline(x) + ψ(plan)·τ(x)`` (see
:mod:`recommender.model`); the boosted part of τ(x) is one LightGBM model with one output per
plan-basis column, and its TreeSHAP values come from LightGBM's ``pred_contrib``
(``effect_model_.contributions``). The summaries sum φ over the twelve component outputs:
"which patient features move the estimated benefit of the therapies, and which way". They
explain the data-driven correction to the evidence prior, not the prior itself (which is a
fixed table by condition). The raw φ of every output are stored as Parquet beside the plots
(ml-notes §3: images cannot be re-analysed). Rows are numbered, never identified.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from features.catalog import COMPONENT_CODES
from recommender.model import PlanOutcomeModel

log = logging.getLogger(__name__)

SHAP_MAX_ROWS = 1000  # TreeSHAP cost is linear in rows; 1000 draws a stable global picture
_N_COMPONENTS = len(COMPONENT_CODES)


# --------------------------------------------------------------------------- SHAP


def shap_values(
    model: PlanOutcomeModel, patients: pd.DataFrame, *, max_rows: int = SHAP_MAX_ROWS, seed: int = 0
) -> dict:
    """TreeSHAP of the effect and adverse-event models on (a sample of) ``patients``.

    Returns ``{"X": DataFrame of encoded features, "effect": (n, K, d+1), "adverse_event":
    (n, K_AE, d+1), "effect_outputs": names, "ae_outputs": names}``; the last slot of each φ
    row is the expected value.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(len(patients))
    if len(rows) > max_rows:
        rows = np.sort(rng.choice(rows, max_rows, replace=False))
    sample = patients.iloc[rows]
    X = model.encoder_.transform(sample)
    names = list(model.encoder_.feature_names_)
    return {
        "X": pd.DataFrame(X, columns=names),
        "effect": model.effect_model_.contributions(X),
        "adverse_event": model.ae_model_.contributions(X),
        "effect_outputs": list(model.effect_names_),
        "ae_outputs": list(model.ae_names_),
    }


def _component_sum(phi: np.ndarray, first: int) -> np.ndarray:
    """Sum of φ over the twelve component outputs starting at ``first`` → (n, d)."""
    return phi[:, first : first + _N_COMPONENTS, :-1].sum(axis=1)


def _long_phi(phi: np.ndarray, outputs: list[str], features: list[str], model: str) -> pd.DataFrame:
    n, k, _ = phi.shape
    frame = pd.DataFrame(phi[:, :, :-1].reshape(n * k, -1).astype(np.float32), columns=features)
    frame.insert(0, "output", np.tile(np.asarray(outputs, dtype=object), n))
    frame.insert(0, "row", np.repeat(np.arange(n), k))
    frame.insert(0, "model", model)
    frame["expected_value"] = phi[:, :, -1].reshape(-1).astype(np.float32)
    return frame


def write_shap_summary(
    model: PlanOutcomeModel,
    patients: pd.DataFrame,
    out_dir: str | Path,
    *,
    max_rows: int = SHAP_MAX_ROWS,
    seed: int = 0,
) -> list[Path]:
    """Write SHAP bar + beeswarm plots (effect and adverse-event models) and the raw φ.

    Files: ``shap_effect_bar.png``, ``shap_effect_beeswarm.png``, ``shap_adverse_event_bar.png``,
    ``shap_adverse_event_beeswarm.png``, ``shap_values.parquet`` (long: model, row, output,
    one column per feature, expected_value) and ``shap_features.parquet`` (the encoded feature
    values of the same rows). Returns the paths written.
    """
    import matplotlib

    matplotlib.use("Agg")  # training runs headless (CI, servers); never open a window
    import matplotlib.pyplot as plt
    import shap

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = shap_values(model, patients, max_rows=max_rows, seed=seed)
    X = values["X"]
    features = list(X.columns)
    written: list[Path] = []
    panels = {
        "effect": (
            _component_sum(values["effect"], 0),
            "SHAP: summed effect of the 12 components (PEG points)",
        ),
        # ae output 0 is the baseline log-odds; components follow it
        "adverse_event": (
            _component_sum(values["adverse_event"], 1),
            "SHAP: summed adverse-event log-odds of the 12 components",
        ),
    }
    for name, (phi, title) in panels.items():
        for kind, plot_type in (("bar", "bar"), ("beeswarm", "dot")):
            plt.close("all")
            shap.summary_plot(
                phi, X, feature_names=features, plot_type=plot_type, show=False, max_display=20
            )
            fig = plt.gcf()
            fig.suptitle(title, fontsize=10)
            path = out_dir / f"shap_{name}_{kind}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    raw = pd.concat(
        [
            _long_phi(values["effect"], values["effect_outputs"], features, "effect"),
            _long_phi(values["adverse_event"], values["ae_outputs"], features, "adverse_event"),
        ],
        ignore_index=True,
    )
    raw.to_parquet(out_dir / "shap_values.parquet", index=False)
    X.astype(np.float32).rename_axis("row").reset_index().to_parquet(
        out_dir / "shap_features.parquet", index=False
    )
    written += [out_dir / "shap_values.parquet", out_dir / "shap_features.parquet"]
    importance = pd.Series(np.abs(panels["effect"][0]).mean(0), index=features)
    log.info("SHAP: top effect modifiers %s", ", ".join(importance.nlargest(5).index))
    return written


def shap_importance(model: PlanOutcomeModel, patients: pd.DataFrame, **kw) -> pd.DataFrame:
    """Mean |φ| per feature for the summed component effects and adverse-event log-odds."""
    values = shap_values(model, patients, **kw)
    features = list(values["X"].columns)
    return pd.DataFrame(
        {
            "feature": features,
            "effect_mean_abs_shap": np.abs(_component_sum(values["effect"], 0)).mean(0),
            "adverse_event_mean_abs_shap": np.abs(_component_sum(values["adverse_event"], 1)).mean(
                0
            ),
        }
    ).sort_values("effect_mean_abs_shap", ascending=False, ignore_index=True)


# --------------------------------------------------------------------------- model card

INTENDED_USE = (
    "Decision support for clinicians choosing a treatment plan for an adult (18+) with "
    "chronic pain (≥ 3 months) whose profile is recorded as in CONTRACT §2. For each patient "
    "it ranks the plans the safety rules allow by expected improvement in PEG-3 at 12 weeks "
    "minus λ × the probability of a treatment-limiting adverse event, with an 80 % predictive "
    "interval, P(response) and the reasons for every exclusion. A clinician reviews every "
    "recommendation with the patient; plans flagged REVIEW need explicit sign-off."
)
OUT_OF_SCOPE = (
    "- Acute pain, cancer pain, palliative care, children and adolescents.\n"
    "- Patients with red-flag symptoms (suspected fracture, infection, malignancy, cauda "
    "equina): screen them out before using the tool.\n"
    "- Choosing drugs within a class, doses, titration or tapering: a plan names classes only.\n"
    "- Autonomous prescribing or ordering without a clinician; triage or emergency decisions.\n"
    "- Populations unlike the training data (other settings, other countries, other coding) "
    "without re-validation."
)
LIMITATIONS = (
    "- Trained on observational episodes: clinicians chose plans for reasons partly "
    "unrecorded, so estimates can be biased by unmeasured confounding even though the model "
    "adjusts for the recorded profile (orthogonalised learner).\n"
    "- Plans rarely or never given in the data are estimated from their components and the "
    "evidence prior, not from outcomes of that combination.\n"
    "- The 80 % interval is a predictive interval for the patient's improvement under the "
    "plan, calibrated on held-out episodes; it is not a confidence interval for the effect.\n"
    "- Adverse events are 'treatment-limiting within 12 weeks' as recorded; rare harms and "
    "long-term harms (dependence, falls) are not captured by this probability.\n"
    "- The safety rules are a floor plus adopted guideline rules; they do not replace "
    "a clinician's review of contraindications and interactions.\n"
    "- When the evaluation uses simulator truth, its metrics describe performance on a "
    "synthetic cohort, not on real patients."
)


# Shown first in the card when the evaluation reports them; everything else follows in full.
HEADLINE_METRICS = (
    "truth_normalized_value",
    "truth_regret",
    "truth_ndcg_at_5",
    "truth_component_pehe",
    "truth_plan_pehe",
    "truth_ae_rmse",
    "ope_model_dr",
    "ope_model_dr_ci_low",
    "ope_model_dr_ci_high",
    "ope_model_ess",
    "ope_model_evaluable",
    "logged_value",
    "rmse_improvement_logged",
    "interval_coverage",
    "interval_target",
    "interval_mean_width",
    "ae_brier",
    "ae_brier_constant",
    "ae_ece",
    "response_brier",
    "safety_floor_violations_test",
    "safety_floor_violations_truth",
)


def _num(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4g}"
    return str(value)


def markdown_table(frame: pd.DataFrame, max_rows: int = 40) -> str:
    """A small GitHub-flavoured table (no optional dependency such as tabulate)."""
    if frame is None or frame.empty:
        return "_none_"
    shown = frame.head(max_rows)
    cols = [str(c) for c in shown.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in shown.iterrows():
        cells = [_num(v).replace("|", "\\|") for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    if len(frame) > max_rows:
        lines.append(f"\n_{len(frame) - max_rows} more row(s) in the CSV artifact._")
    return "\n".join(lines)


def _baselines(evaluation) -> pd.DataFrame | None:
    tables = getattr(evaluation, "tables", {}) or {}
    for name, table in tables.items():
        if "baseline" in name.lower():
            return table
    metrics = getattr(evaluation, "metrics", {}) or {}
    rows = [(k, v) for k, v in sorted(metrics.items()) if "baseline" in k.lower()]
    return pd.DataFrame(rows, columns=["metric", "value"]) if rows else None


def model_card(
    *,
    config,
    evaluation,
    metadata: dict,
    data_summary: dict,
    registered: dict | None = None,
) -> str:
    """Markdown model card.

    ``data_summary``: episodes, patients, train/test counts, ``date_min``/``date_max``,
    ``data_hash``; ``registered``: model name, version, URI and run id when known.
    """
    registered = registered or {}
    metrics = getattr(evaluation, "metrics", {}) or {}
    headline = pd.DataFrame(
        [(k, metrics[k]) for k in HEADLINE_METRICS if k in metrics], columns=["metric", "value"]
    )
    all_metrics = pd.DataFrame(sorted(metrics.items()), columns=["metric", "value"])
    value = getattr(evaluation, "value_for_promotion", None)
    counts = metadata.get("row_counts", {}) or {}
    name = registered.get("name", getattr(config, "model_name", "painplan"))
    version = registered.get("version", "unregistered")
    date_range = (
        f"{data_summary.get('date_min')} to {data_summary.get('date_max')}"
        if data_summary.get("date_min")
        else "not recorded (no start_date)"
    )
    truth_note = (
        "simulator ground truth (`--truth`)"
        if getattr(config, "truth", None)
        else "logged outcomes only (off-policy estimates)"
    )
    params = getattr(config, "model", None)
    param_text = (
        ", ".join(f"{k}={v}" for k, v in vars(params).items()) if params is not None else ""
    )
    sections = [
        f"# Model card: {name} version {version}",
        f"_Generated {datetime.now(UTC).isoformat(timespec='seconds')} by `painplan train`._",
        "## Intended use",
        INTENDED_USE,
        "## Out-of-scope use",
        OUT_OF_SCOPE,
        "## Model",
        "Factorised plan-outcome model (`recommender.model.PlanOutcomeModel`): per-patient "
        "component effects learned by gradient boosting from an evidence prior, orthogonalised "
        "against the clinicians' logging policy; logistic adverse-event model; split-conformal "
        "80 % intervals. Plans are ranked by utility = expected_improvement − λ·p_adverse_event "
        f"with λ = {_num(metadata.get('lambda_ae'))}, after the safety gate.\n\n"
        f"Parameters: {param_text}; seed {getattr(config, 'seed', 'n/a')}.",
        "## Data",
        markdown_table(
            pd.DataFrame(
                [
                    ("episodes", data_summary.get("episodes", counts.get("episodes"))),
                    ("patients", data_summary.get("patients", counts.get("patients"))),
                    (
                        "training episodes / patients",
                        f"{_num(counts.get('train_episodes'))} / {_num(counts.get('train_patients'))}",
                    ),
                    (
                        "test episodes / patients",
                        f"{_num(counts.get('test_episodes'))} / {_num(counts.get('test_patients'))}",
                    ),
                    (
                        "split",
                        f"{getattr(config, 'split', 'n/a')} "
                        f"(test fraction {getattr(config, 'test_fraction', 'n/a')})",
                    ),
                    ("episode dates", date_range),
                    (
                        "data hash",
                        f"`{data_summary.get('data_hash') or metadata.get('data_hash')}`",
                    ),
                ],
                columns=["item", "value"],
            )
        ),
        "## Evaluation",
        f"Held-out test patients, evaluated against {truth_note}. "
        f"Value used for promotion: **{_num(value)}**.",
        markdown_table(headline),
        f"<details><summary>All {len(all_metrics)} metrics (also logged with the run)"
        "</summary>\n\n"
        + markdown_table(all_metrics, max_rows=len(all_metrics))
        + "\n\n</details>",
        "### Baselines",
        markdown_table(_baselines(evaluation)),
        "## Explanations",
        "Global SHAP summaries of the effect and adverse-event models are in `shap/` "
        "(bar and beeswarm plots, raw values in `shap_values.parquet`).",
        "## Limitations",
        LIMITATIONS,
        "## Safety rules",
        f"Safety ruleset version `{metadata.get('ruleset_version')}` "
        "(`recommender.safety`): the CONTRACT §5 floor plus the stricter rules adopted from "
        "clinical-evidence.md. Promotion requires zero floor violations among the top-5 "
        "recommendations for the validation patients.",
        "## Lineage",
        markdown_table(
            pd.DataFrame(
                [
                    ("registered model", f"{name} v{version}"),
                    ("model URI", registered.get("model_uri", "n/a")),
                    ("MLflow run id", registered.get("run_id", metadata.get("mlflow_run_id"))),
                    ("code version", metadata.get("code_version")),
                    ("feature schema", metadata.get("schema_fingerprint")),
                    ("bundle sha256", metadata.get("content_sha256")),
                    ("created", metadata.get("created_at")),
                    (
                        "packages",
                        ", ".join(
                            f"{k} {v}" for k, v in (metadata.get("package_versions") or {}).items()
                        ),
                    ),
                ],
                columns=["item", "value"],
            )
        ),
    ]
    return "\n\n".join(str(s) for s in sections) + "\n"
