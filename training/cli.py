"""The ``painplan`` command line (CONTRACT §6).

Thin by design: each command parses its options, builds the frozen config of the stage it
runs, calls the same ``run`` function the tests call, and maps known errors to a
one-paragraph message and a non-zero exit code (tracebacks only with ``--debug``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Callable, Sequence

from features.errors import ConfigError, ContractError, ModelError, PainplanError

EXIT_CONTRACT = 2
EXIT_MODEL = 3
EXIT_CONFIG = 4
EXIT_OTHER = 1

log = logging.getLogger("painplan")

_COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def command(name: str):
    """Register a function that adds a subcommand's options and sets its handler."""

    def deco(fn):
        _COMMANDS[name] = fn
        return fn

    return deco


# --- validate -------------------------------------------------------------------------------

@command("validate")
def _validate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE",
                   help="a .csv or .parquet file of patients (CONTRACT §2) or episodes (§3)")
    p.add_argument("--kind", choices=["auto", "patients", "episodes"], default="auto",
                   help="what the file holds; 'auto' (default) treats it as episodes when it has "
                        "any episode column (episode_id, plan, peg_12wk, adverse_event)")
    p.set_defaults(handler=_validate)


def _validate(args: argparse.Namespace) -> int:
    from features.io import read_table
    from features.validate import guess_kind, validate

    df = read_table(args.file)
    kind = guess_kind(df.columns) if args.kind == "auto" else args.kind
    result = validate(df, kind=kind)  # warnings (ignored extra columns) are logged by validate
    print(f"{args.file}: {len(result.frame)} {kind} row(s) conform to the painplan contract")
    return 0


# --- simulate -------------------------------------------------------------------------------

@command("simulate")
def _simulate_parser(p: argparse.ArgumentParser) -> None:
    from training.simulate import add_cli_options

    add_cli_options(p)


# --- train / promote / recommend ------------------------------------------------------------

def _stage(message: str) -> None:
    """Progress of long commands, on stderr so stdout stays the result."""
    print(f"painplan: {message}", file=sys.stderr, flush=True)


def _engine_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--engine", choices=["local", "dask"], default="local",
                   help=f"where {what} runs: 'local' (default) in this process, 'dask' on a Dask "
                        "cluster (needs the 'dask' extra: pip install -e '.[dask]')")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler to use with --engine dask, e.g. tcp://10.0.0.5:8786 "
                        "(default: start a local cluster of 2 worker processes for this run)")


@command("train")
def _train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="FILE",
                   help="episode file (.csv or .parquet, CONTRACT §3)")
    p.add_argument("--config", metavar="FILE", help="YAML training config (TrainConfig fields)")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: painplan)")
    p.add_argument("--truth", metavar="FILE",
                   help="simulator truth file from 'painplan simulate --truth' for evaluation")
    p.add_argument("--promote", action="store_true", default=None,
                   help="make the new version champion if it is safe and at least as good")
    p.add_argument("--seed", type=int, metavar="S", help="random seed (default: from config, 0)")
    p.add_argument("--model-name", metavar="NAME", help="registered model name (default: painplan)")
    _engine_options(p, "the LightGBM fitting")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.pipeline import run

    config = TrainConfig.from_file(
        args.config, data=args.data, experiment=args.experiment, truth=args.truth,
        promote=args.promote, seed=args.seed, model_name=args.model_name,
    )
    result = run(config, progress=_stage, engine=args.engine, scheduler=args.scheduler)
    print(f"run id: {result.run_id}")
    print(f"model URI: {result.model_uri}")
    if result.promotion is not None:
        verdict = "promoted" if result.promotion.promoted else "not promoted"
        print(f"promotion: {verdict}: {result.promotion.reason}")
    return 0


@command("promote")
def _promote_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", metavar="V", help="registered version (default: the latest)")
    p.add_argument("--model-name", metavar="NAME", default="painplan",
                   help="registered model name (default: painplan)")
    p.set_defaults(handler=_promote)


def _promote(args: argparse.Namespace) -> int:
    from training.register import latest_version, promote
    from training.tracking import configure_tracking

    configure_tracking()
    version = args.version or latest_version(args.model_name)
    decision = promote(version, model_name=args.model_name)
    verdict = "promoted" if decision.promoted else "not promoted"
    print(f"{args.model_name} version {version}: {verdict}: {decision.reason}")
    return 0 if decision.promoted else 1


def _top_k(text: str) -> int:
    from recommender.recommend import MAX_TOP_K

    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_TOP_K:
        raise argparse.ArgumentTypeError(
            f"must be a whole number between 1 and {MAX_TOP_K}, got {text!r}")
    return value


@command("recommend")
def _recommend_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patients", required=True, metavar="FILE_OR_DIR",
                   help="patient file (.csv or .parquet, CONTRACT §2), or a directory of them "
                        "(a Parquet dataset)")
    p.add_argument("--out", required=True, metavar="FILE_OR_DIR",
                   help="ranked plans to write (CONTRACT §7): a .csv or .parquet file, or with "
                        "--engine dask a directory of Parquet partitions")
    p.add_argument("--top-k", type=_top_k, default=5, metavar="K",
                   help="plans per patient, 1-50 (default: 5)")
    p.add_argument("--model", metavar="URI",
                   help="models:/painplan@champion (default), models:/painplan/3, or a local "
                        "model bundle directory")
    p.add_argument("--model-name", metavar="NAME", default="painplan",
                   help="registered model whose champion is the default (default: painplan)")
    p.add_argument("--no-model-cache", dest="model_cache", action="store_false",
                   help="download the model from the MLflow registry instead of using the local "
                        "model cache. Registered versions are cached, verified by SHA-256 "
                        "against the registry on every run, in $PAINPLAN_MODEL_CACHE (default "
                        "$PAINPLAN_HOME/model-cache, i.e. ./.painplan/model-cache); aliases such "
                        "as @champion are resolved by the registry every time. Clear the cache "
                        "by deleting that directory; PAINPLAN_MODEL_CACHE=off turns it off")
    _engine_options(p, "scoring")
    p.add_argument("--partition-rows", type=int, metavar="N",
                   help="with --engine dask: at most N patients per partition (default: 20000; "
                        "memory per worker thread ≈ 1 kB × N + 235 MB, see docs/scale-out.md)")
    p.set_defaults(handler=_recommend)


def _recommend(args: argparse.Namespace) -> int:
    # Start-up cost of a batch run (issue #7). Importing pandas, pyarrow, LightGBM, sklearn and
    # SciPy creates about a million long-lived objects and no garbage, and CPython 3.11's cyclic
    # collector walks them again and again while they are imported (~0.3 s); so collect nothing
    # during the imports, then move what they created to the permanent generation, where
    # neither later collections nor the collections of interpreter exit walk it.
    gc.disable()
    try:
        from training.pipeline import recommend_file
    finally:
        gc.freeze()
        gc.enable()

    if args.partition_rows is not None and args.engine != "dask":
        raise ConfigError("--partition-rows applies to --engine dask only; add --engine dask or "
                          "drop --partition-rows")
    if args.engine == "dask":
        from training.batch import PARTITION_ROWS
        from training.dask_recommend import recommend_dataset

        rows = PARTITION_ROWS if args.partition_rows is None else args.partition_rows
        n = recommend_dataset(args.patients, args.out, model=args.model, top_k=args.top_k,
                              model_name=args.model_name, scheduler=args.scheduler,
                              partition_rows=rows, progress=_stage,
                              use_model_cache=args.model_cache)
    else:
        n = recommend_file(args.patients, args.out, model=args.model, top_k=args.top_k,
                           model_name=args.model_name, progress=_stage, scheduler=args.scheduler,
                           use_model_cache=args.model_cache)
    print(f"{args.out}: {n} ranked plan row(s) written")
    gc.freeze()  # the output is complete: spare the exit collections (~0.4 s) the model etc.
    return 0


# --- serve / export-outcomes (the HTTP service, CONTRACT §8) -------------------------------

@command("serve")
def _serve_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=3000, metavar="P", help="port (default: 3000)")
    p.add_argument("--host", default="127.0.0.1", metavar="HOST",
                   help="interface to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--model-tag", metavar="TAG",
                   help="BentoML model tag to serve (default: PAINPLAN_MODEL_TAG, else the "
                        "MLflow champion, imported into the BentoML store when needed)")
    p.add_argument("--model-name", default="painplan", metavar="NAME",
                   help="registered model whose champion is served (default: painplan)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes, each with its own copy of the model (default: 1)")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from training.serving import ServeConfig, resolve_tag, run_until_stopped, start_server

    config = ServeConfig(host=args.host, port=args.port, model_tag=args.model_tag,
                         model_name=args.model_name, workers=args.workers)
    tag = resolve_tag(config)
    _stage(f"serving {tag} at {config.url} (Ctrl-C stops)")
    return run_until_stopped(start_server(config, tag))


@command("export-outcomes")
def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="FILE",
                   help="episode file to write (.csv or .parquet, CONTRACT §3)")
    p.add_argument("--audit-url", metavar="URL",
                   help="audit store (default: PAINPLAN_AUDIT_URL, else "
                        "sqlite:///$PAINPLAN_HOME/audit.db)")
    p.set_defaults(handler=_export_outcomes)


def _export_outcomes(args: argparse.Namespace) -> int:
    import os

    from features.io import write_table
    from features.validate import validate
    from recommender.audit import AuditStore
    from recommender.settings import AUDIT_URL_ENV, default_audit_url

    url = args.audit_url or os.environ.get(AUDIT_URL_ENV, "").strip() or default_audit_url()
    store = AuditStore(url)
    try:
        if not store.has_schema():
            raise ConfigError(f"{store!r} holds no painplan audit records; point --audit-url "
                              f"(or {AUDIT_URL_ENV}) at the store the service writes to")
        episodes = store.outcome_episodes()
    finally:
        store.close()
    if len(episodes) == 0:
        raise ConfigError(f"the audit store {store!r} holds no reported outcomes yet; report "
                          "them with POST /outcomes first")
    # The same check 'painplan train' runs, so the file is accepted there.
    validate(episodes, "episodes")
    write_table(episodes, args.out)
    shown = int(episodes["propensity"].notna().sum())
    print(f"{args.out}: {len(episodes)} episode(s) written ({shown} with a propensity: the "
          "plan was among those shown)")
    return 0


# --- entry point ----------------------------------------------------------------------------

@command("demo")
def _demo_parser(p: argparse.ArgumentParser) -> None:
    from training.demo import add_cli_options

    add_cli_options(p)


@command("cds-request")
def _cds_request_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="a FHIR R4 bundle (JSON) holding one patient's record")
    p.set_defaults(handler=_cds_request)


def _cds_request(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from recommender.cds_hooks import request_from_bundle

    path = Path(args.bundle)
    try:
        bundle = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ContractError(f"{path}: cannot read a FHIR bundle ({err}); give a JSON file "
                            "such as ../shared/data/synthea/*/*.json") from err
    print(json.dumps(request_from_bundle(bundle)))
    return 0


_HELP = {
    "cds-request": "print a CDS Hooks patient-view request (with prefetch) built from a FHIR "
                   "bundle, to try the service",
    "demo": "from nothing: simulate, validate, train, promote a champion and serve it",
    "validate": "check a patient or episode file against the contract; list every violation",
    "simulate": "write a synthetic, literature-calibrated cohort of treatment episodes",
    "train": "validate episodes, fit, evaluate, log an MLflow run and register a model version",
    "promote": "make a registered version champion if it is safe and at least as good",
    "recommend": "rank plans for every patient in a file with the champion (or given) model",
    "serve": "serve the HTTP API (CONTRACT §8) with the champion model",
    "export-outcomes": "write outcomes reported to the service as an episode file for retraining",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``painplan`` parser. ``only``: build just that command's options (the others are
    listed by name and help but left empty), so running one command does not import the
    modules that define another's options (``simulate``/``demo`` pull in the simulator)."""
    parser = argparse.ArgumentParser(
        prog="painplan",
        description="Personalised, safety-gated chronic-pain treatment plans: simulate, validate, "
                    "train, recommend and serve.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add in _COMMANDS.items():
        command_parser = sub.add_parser(name, help=_HELP.get(name, ""),
                                        description=_HELP.get(name, ""))
        if only is None or name == only:
            add(command_parser)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The command named on the command line, when it is a known one (else None: the full
    parser is built and argparse reports the problem as usual)."""
    for token in argv:
        if token == "--":
            return None
        if not token.startswith("-"):
            return token if token in _COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_chosen_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except ContractError as err:
        return _fail(args, err, EXIT_CONTRACT)
    except ModelError as err:
        return _fail(args, err, EXIT_MODEL)
    except ConfigError as err:
        return _fail(args, err, EXIT_CONFIG)
    except PainplanError as err:
        return _fail(args, err, EXIT_OTHER)
    except KeyboardInterrupt:
        print("painplan: interrupted", file=sys.stderr)
        return 130


def _fail(args: argparse.Namespace, err: Exception, code: int) -> int:
    if args.debug:
        raise err
    print(f"painplan {args.command}: error: {err}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
