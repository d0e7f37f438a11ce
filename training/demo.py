"""``painplan demo``: from a fresh checkout with nothing configured to a working model.

Simulates a cohort with known truth, validates it against the contract, trains, evaluates,
registers and promotes a champion in the project-local MLflow store (``PAINPLAN_HOME``,
default ``./.painplan``). Serving is added on top when the service lands.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from features.io import read_table
from features.validate import validate
from training.config import TrainConfig
from training.simulate import SimulateRunConfig
from training.simulate import run as simulate_run
from training.tracking import painplan_home

log = logging.getLogger(__name__)


def add_cli_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=20_000,
                   help="episodes to simulate (default: 20000)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    p.add_argument("--no-train", action="store_true",
                   help="only simulate and validate the cohort")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    start = time.monotonic()
    home = painplan_home()
    folder = Path(home) / "demo"
    episodes, truth = folder / "episodes.parquet", folder / "truth.parquet"
    print(f"[1/3] simulating {args.n} episodes (seed {args.seed}) into {folder}", flush=True)
    simulate_run(SimulateRunConfig(n=args.n, seed=args.seed, out=episodes, truth=truth, truth_n=1000))
    print("[2/3] validating them against the contract", flush=True)
    checked = validate(read_table(episodes), "episodes")
    print(f"      {len(checked.frame)} episodes conform to the painplan contract", flush=True)
    if args.no_train:
        return 0
    from training.pipeline import run as train_run

    print("[3/3] training, evaluating, registering and promoting the champion", flush=True)
    config = TrainConfig(data=str(episodes), truth=str(truth), seed=args.seed, promote=True)
    result = train_run(config, progress=lambda msg: print(f"      {msg}", flush=True))
    nv = result.metrics.get("truth_normalized_value")
    print(f"\ndone in {time.monotonic() - start:.0f} s: run {result.run_id}, model {result.model_uri}")
    if nv is not None:
        print(f"normalized policy value against the simulator's truth: {nv:.3f}")
    if result.promotion is not None:
        print(f"promotion: {result.promotion.reason}")
    return 0
