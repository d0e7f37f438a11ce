"""``painplan demo``: from a fresh checkout with nothing configured to a running service.

Simulates a cohort with known truth, validates it against the contract, trains, evaluates,
registers and promotes a champion in the project-local MLflow store (``PAINPLAN_HOME``,
default ``./.painplan``); promotion also puts the champion into the BentoML model store
(``$PAINPLAN_HOME/bentoml``). Then it generates a clinician key, an auditor key and an HMAC
key, starts the HTTP service and prints the URL, the keys and a ``curl`` command to paste.

The cohort is modest (5000 episodes) so the demo is serving well within three minutes on two
cores (about a minute measured); ``painplan train`` on a larger simulated file gives a
better model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path

from features.errors import ConfigError
from features.io import read_table
from features.validate import validate
from training.config import TrainConfig
from training.simulate import SimulateRunConfig
from training.simulate import run as simulate_run
from training.tracking import painplan_home

log = logging.getLogger(__name__)

DEMO_EPISODES = 5000
DEMO_TRUTH_PATIENTS = 500
KEYS_FILE = "keys.env"
# A patient the safety floor has plenty to say about: eGFR 25 and a GI bleed rule out
# NSAIDs, opioid use disorder and a past intolerance rule out opioids.
EXAMPLE_PATIENT = {
    "patient_id": "demo-patient-1",
    "age": 67,
    "sex": "female",
    "pain_condition": "osteoarthritis",
    "pain_duration_months": 36,
    "pain_intensity": 7,
    "peg": 6.7,
    "phq9": 11,
    "gad7": 6,
    "bmi": 31,
    "egfr": 25,
    "gi_bleed_history": True,
    "opioid_use_disorder": True,
    "prior_opioid": "intolerant",
}


def add_cli_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--n",
        type=int,
        default=DEMO_EPISODES,
        help=f"episodes to simulate (default: {DEMO_EPISODES})",
    )
    p.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    p.add_argument("--no-train", action="store_true", help="only simulate and validate the cohort")
    p.add_argument(
        "--no-serve",
        action="store_true",
        help="stop after training and promotion; do not start the service",
    )
    p.add_argument(
        "--port",
        type=int,
        default=3000,
        metavar="P",
        help="port of the demo service (default: 3000)",
    )
    p.set_defaults(handler=_handle)


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _handle(args: argparse.Namespace) -> int:
    start = time.monotonic()
    home = painplan_home()
    folder = Path(home) / "demo"
    steps = 2 if args.no_train else (3 if args.no_serve else 4)
    if not args.no_train and not args.no_serve and not _port_is_free("127.0.0.1", args.port):
        raise ConfigError(
            f"port {args.port} on 127.0.0.1 is already in use; stop what is using it or "
            "pass another port with --port"
        )
    episodes, truth = folder / "episodes.parquet", folder / "truth.parquet"
    print(f"[1/{steps}] simulating {args.n} episodes (seed {args.seed}) into {folder}", flush=True)
    simulate_run(
        SimulateRunConfig(
            n=args.n, seed=args.seed, out=episodes, truth=truth, truth_n=DEMO_TRUTH_PATIENTS
        )
    )
    print(f"[2/{steps}] validating them against the contract", flush=True)
    checked = validate(read_table(episodes), "episodes")
    print(f"      {len(checked.frame)} episodes conform to the painplan contract", flush=True)
    if args.no_train:
        return 0
    from training.pipeline import run as train_run

    print(f"[3/{steps}] training, evaluating, registering and promoting the champion", flush=True)
    config = TrainConfig(data=str(episodes), truth=str(truth), seed=args.seed, promote=True)
    result = train_run(config, progress=lambda msg: print(f"      {msg}", flush=True))
    nv = result.metrics.get("truth_normalized_value")
    print(f"      run {result.run_id}, model {result.model_uri}")
    if nv is not None:
        print(f"      normalized policy value against the simulator's truth: {nv:.3f}")
    if result.promotion is not None:
        print(f"      promotion: {result.promotion.reason}")
    if args.no_serve:
        print(f"\ndone in {time.monotonic() - start:.0f} s (not serving: --no-serve)")
        return 0
    return _serve(args, folder, start)


def _serve(args: argparse.Namespace, folder: Path, start: float) -> int:
    from training.serving import (
        ServeConfig,
        champion_tag,
        run_until_stopped,
        start_server,
        wait_ready,
    )

    print("[4/4] starting the HTTP service", flush=True)
    # One INFO line per readiness poll would bury the instructions printed below.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    clinician, auditor = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "PAINPLAN_API_KEYS": f"clinician:{clinician},auditor:{auditor}",
        "PAINPLAN_HMAC_KEY": secrets.token_hex(32),
        "PAINPLAN_DEMO": "1",
        # CDS Hooks JWT checks are off for the local demo only (no EHR issues tokens here),
        # and the look-back reaches the public test patients, whose records carry fixed
        # 2017-2023 dates.
        "PAINPLAN_CDS_AUTH": "off",
        "PAINPLAN_CDS_LOOKBACK_DAYS": "5000",
    }
    keys_file = folder / KEYS_FILE
    keys_file.write_text(
        "".join(
            f"export {k}='{env[k]}'\n"
            for k in ("PAINPLAN_API_KEYS", "PAINPLAN_HMAC_KEY", "PAINPLAN_DEMO",
                      "PAINPLAN_CDS_AUTH", "PAINPLAN_CDS_LOOKBACK_DAYS")
        ),
        encoding="utf-8",
    )
    keys_file.chmod(0o600)
    config = ServeConfig(port=args.port)
    tag = champion_tag(config.model_name)
    proc = start_server(config, tag, environ=env)
    wait_ready(config.url, proc)
    body = json.dumps({"patient": EXAMPLE_PATIENT, "top_k": 3})
    print(
        f"""
painplan is serving {tag} at {config.url} (ready {time.monotonic() - start:.0f} s after start)

  clinician key : {clinician}
  auditor key   : {auditor}
  (also in {keys_file}: 'source' it, then 'painplan serve' reuses them)

Rank plans for a patient:

  curl -s -X POST {config.url}/recommend \\
    -H 'Authorization: Bearer {clinician}' -H 'Content-Type: application/json' \\
    -d '{body}'

Read the audit trail:   curl -s -H 'Authorization: Bearer {auditor}' '{config.url}/audit?limit=5'
Model card and lineage: curl -s -H 'Authorization: Bearer {auditor}' {config.url}/model
CDS Hooks discovery:    curl -s {config.url}/cds-services   (a patient-view call: see README)
Web pages:              {config.url}/ui/ (clinician)   {config.url}/ui/auditor
API description:        {config.url}/openapi.json    Metrics: {config.url}/metrics

Ctrl-C stops the service.""",
        flush=True,
    )
    return run_until_stopped(proc)
