"""Connect to a Dask cluster for ``--engine dask``: a given scheduler, or a local one.

``cluster(address)`` is the only way the Dask engines get a client. It

* with ``address=None`` starts a :class:`distributed.LocalCluster` of 2 worker *processes* with
  one thread each and no dashboard (the shape of the shared 2-core machine; LightGBM and
  numpy inside a worker then get one core each instead of fighting over both), and shuts it
  down afterwards;
* with an address (``tcp://host:8786``, ``tls://…``) checks that it parses and answers before
  a :class:`distributed.Client` is built, so a typo fails in one paragraph instead of a
  30-second hang and a traceback; then waits for at least one worker;
* checks that every worker runs painplan with the same feature schema and safety ruleset as
  this process: a worker with other code would score or fit with other rules, silently.

Dask is imported here, inside functions: it is an optional extra (``pip install -e
'.[dask]'``) and nothing in painplan needs it unless ``--engine dask`` is chosen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator

from features.errors import ConfigError

log = logging.getLogger(__name__)

LOCAL_WORKERS = 2
CONNECT_TIMEOUT_S = 10
WORKER_WAIT_S = 60


def _require_dask():
    try:
        import dask  # noqa: F401
        import distributed
    except ImportError as err:
        raise ConfigError(
            f"--engine dask needs Dask, which is not installed here ({err}). Install the extra "
            "(dask[dataframe,distributed]) with pip install -e '.[dask]' in the checkout, or "
            "use --engine local."
        ) from err
    return distributed


def check_dask(address: str | None) -> None:
    """Fail fast, in words, when Dask is not installed, or a scheduler ``address`` is
    malformed or nothing listens there (``None`` means a local cluster). Callers run it before
    slow preparations."""
    _require_dask()
    if address is not None:
        _probe(address.strip())


def _probe(address: str) -> None:
    from distributed.comm.addressing import parse_address, parse_host_port

    hint = (
        "pass the scheduler's address as printed by 'dask scheduler' or your cluster "
        "manager, e.g. tcp://10.0.0.5:8786, or omit --scheduler to start a local cluster"
    )
    try:
        scheme, location = parse_address(address, strict=True)
        host, port = parse_host_port(location)
    except ValueError as err:
        raise ConfigError(
            f"--scheduler {address!r} is not a Dask scheduler address ({err}); {hint}"
        ) from err
    if scheme not in ("tcp", "tls"):
        return  # inproc/ucx/ws: let distributed connect (and time out) by itself
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConfigError(
            f"cannot reach the Dask scheduler at {address} ({err.strerror or err}); check that "
            "the scheduler is running, that host and port are right and that no firewall "
            f"blocks port {port} from this machine, or omit --scheduler to start a local cluster"
        ) from err


def _worker_report() -> dict:
    """Run on every worker: the code identity a worker would fit or score with."""
    import platform

    from features.encode import schema_fingerprint
    from recommender.safety import RULESET_VERSION

    return {
        "schema": schema_fingerprint(),
        "ruleset": RULESET_VERSION,
        "python": platform.python_version(),
    }


def check_workers(client) -> int:
    """Refuse workers whose painplan differs from ours; returns the number of workers."""
    mine = _worker_report()
    try:
        reports = client.run(_worker_report)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"the Dask workers cannot run painplan ({type(err).__name__}: {err}); install the "
            "same painplan version (with its 'dask' extra) in the workers' environment, e.g. in "
            "the worker image of dask-kubernetes or the job script of dask-jobqueue"
        ) from err
    odd = {
        w: r
        for w, r in reports.items()
        if (r["schema"], r["ruleset"]) != (mine["schema"], mine["ruleset"])
    }
    if odd:
        worker, report = next(iter(odd.items()))
        raise ConfigError(
            f"{len(odd)} of {len(reports)} Dask worker(s) run other painplan code than this "
            f"process (e.g. {worker}: feature schema {report['schema']}, ruleset "
            f"{report['ruleset']}; here: {mine['schema']}, {mine['ruleset']}); deploy the same "
            "painplan version to the workers so they score and fit with the same rules"
        )
    return len(reports)


def _worker_log_level() -> int:
    # Local workers would log a failing task's traceback at ERROR; the CLI reports the error
    # itself in one paragraph, so only --debug shows their logs.
    debugging = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    return logging.INFO if debugging else logging.CRITICAL


@contextlib.contextmanager
def _quiet(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise a library logger's threshold for a block (Dask logs every connection at INFO,
    which the CLI's INFO logging would print), unless debugging."""
    logger = logging.getLogger(name)
    before = logger.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr while worker processes are spawned, so they inherit
    it: LightGBM's C++ network messages ("[LightGBM] [Info] Listening...") are printed by the
    workers straight to their stdout, which must stay the CLI's result channel."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable stdout (e.g. closed): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def cluster(
    address: str | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    n_workers: int = LOCAL_WORKERS,
) -> Iterator:
    """Yield a connected :class:`distributed.Client`; close it (and a local cluster) after."""
    distributed = _require_dask()
    say = progress or log.info
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet("distributed"))
        if address is None:
            say(f"starting a local Dask cluster ({n_workers} worker processes, 1 thread each)")
            with _stdout_to_stderr():
                local = stack.enter_context(
                    distributed.LocalCluster(
                        n_workers=n_workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=None,
                        silence_logs=_worker_log_level(),
                    )
                )
            address = local.scheduler_address
        else:
            address = address.strip()
            _probe(address)
        try:
            client = stack.enter_context(
                distributed.Client(address, timeout=f"{CONNECT_TIMEOUT_S}s", set_as_default=False)
            )
        except (OSError, TimeoutError) as err:
            raise ConfigError(
                f"cannot connect to the Dask scheduler at {address} ({err}); "
                "check that it is a Dask scheduler and that it is running"
            ) from err
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError as err:
            raise ConfigError(
                f"the Dask scheduler at {address} has had no workers for "
                f"{WORKER_WAIT_S} s; start workers ('dask worker {address}') or "
                "scale the cluster up, then retry"
            ) from err
        # The current client for this block only (lightgbm.dask looks it up); no global default.
        stack.enter_context(client.as_current())
        n = check_workers(client)
        say(
            f"Dask cluster at {address}: {n} worker(s), {sum(client.nthreads().values())} thread(s)"
        )
        yield client
