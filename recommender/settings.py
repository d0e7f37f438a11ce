"""The service's configuration: one frozen object, built once from the environment.

=========================  ====================================================================
variable                   meaning (default)
=========================  ====================================================================
``PAINPLAN_MODEL_TAG``     BentoML model tag to serve (``painplan:latest``, resolved to its
                           version at start-up and echoed in every answer); ``painplan serve``
                           always passes the champion's explicit version tag
``PAINPLAN_HOME``          project-local storage (``./.painplan``)
``BENTOML_HOME``           BentoML model store; the painplan CLI sets ``$PAINPLAN_HOME/bentoml``
``PAINPLAN_AUDIT_URL``     SQLAlchemy URL of the audit store
                           (``sqlite:///$PAINPLAN_HOME/audit.db``), e.g.
                           ``postgresql+psycopg://postgres@127.0.0.1:5432/painplan``
``PAINPLAN_HMAC_KEY``      secret for pseudonymous patient keys (required unless demo mode)
``PAINPLAN_DEMO``          ``1``: a missing HMAC key is generated (pseudonyms then change on
                           every restart, which is fine for a demo and nothing else)
``PAINPLAN_API_KEYS``      ``role:key`` pairs (see :mod:`recommender.access`)
``PAINPLAN_API_KEYS_FILE`` file with more pairs
``PAINPLAN_MAX_BODY_BYTES`` request-size limit (65536; a full profile is about 1.5 kB)
``PAINPLAN_THREADS``       worker threads per worker process for the routes' work (2); one of
                           them runs ``/recommend``'s micro-batches, one batch at a time
``PAINPLAN_MAX_BATCH``     most ``/recommend`` requests answered as one micro-batch (32; 1
                           turns batching off); see docs/serving.md
``PAINPLAN_CPU_AFFINITY``  ``on``: pin worker k to the k-th CPU (``off``); for a machine given
                           to painplan, see :mod:`recommender.cpu_affinity`
=========================  ====================================================================
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from features.errors import ConfigError
from recommender.access import ApiKeys

log = logging.getLogger(__name__)

MODEL_TAG_ENV = "PAINPLAN_MODEL_TAG"
DEFAULT_MODEL_TAG = "painplan:latest"
AUDIT_URL_ENV = "PAINPLAN_AUDIT_URL"
HMAC_KEY_ENV = "PAINPLAN_HMAC_KEY"
DEMO_ENV = "PAINPLAN_DEMO"
MAX_BODY_ENV = "PAINPLAN_MAX_BODY_BYTES"
THREADS_ENV = "PAINPLAN_THREADS"
MAX_BATCH_ENV = "PAINPLAN_MAX_BATCH"
CPU_AFFINITY_ENV = "PAINPLAN_CPU_AFFINITY"
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_BODY_BYTES = 64 * 1024
MIN_HMAC_KEY_LENGTH = 32  # characters; a pseudonym is only as strong as its key


def painplan_home(environ: Mapping[str, str] = os.environ) -> Path:
    """``$PAINPLAN_HOME`` or ``./.painplan`` (the rule of ``training.tracking.painplan_home``,
    restated because the serving side must not import ``training``)."""
    return Path(environ.get("PAINPLAN_HOME") or ".painplan").expanduser().resolve()


def default_bentoml_home(environ: Mapping[str, str] = os.environ) -> Path:
    """Where painplan keeps BentoML's store unless ``BENTOML_HOME`` says otherwise: inside
    the painplan home, so a fresh clone is self-contained."""
    return painplan_home(environ) / "bentoml"


def default_audit_url(environ: Mapping[str, str] = os.environ) -> str:
    return f"sqlite:///{(painplan_home(environ) / 'audit.db').as_posix()}"


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name}={raw!r} must be a positive whole number; fix or unset it.")
    return value


def _switch(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip()
    if raw.lower() in ("on", "1", "true", "yes"):
        return True
    if raw.lower() in ("", "off", "0", "false", "no"):
        return False
    raise ConfigError(f"{name}={raw!r} must be 'on' or 'off'; fix or unset it.")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service reads from its environment, checked once at start-up."""

    model_tag: str
    audit_url: str
    hmac_key: bytes = field(repr=False)
    api_keys: ApiKeys
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    threads: int = 2
    max_batch: int = DEFAULT_MAX_BATCH
    cpu_affinity: bool = False
    demo: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ServiceConfig:
        """Build and check the configuration; raises :class:`ConfigError` naming the
        variable to fix."""
        demo = environ.get(DEMO_ENV, "").strip().lower() in ("1", "true", "yes")
        key = environ.get(HMAC_KEY_ENV, "")
        if not key:
            if not demo:
                raise ConfigError(
                    f"{HMAC_KEY_ENV} is not set: the audit trail stores patient ids only as "
                    "HMAC-SHA256 pseudonyms and needs a secret for them. Set it to a long "
                    "random value kept outside the database (e.g. 'python -c \"import "
                    f"secrets; print(secrets.token_hex(32))\"'), or set {DEMO_ENV}=1 for a "
                    "throw-away demo key."
                )
            key = secrets.token_hex(32)
            log.warning(
                "demo mode: generated a temporary %s; patient pseudonyms in the audit "
                "store will not match across restarts",
                HMAC_KEY_ENV,
            )
        elif len(key) < MIN_HMAC_KEY_LENGTH:
            raise ConfigError(
                f"{HMAC_KEY_ENV} has {len(key)} characters; use at least "
                f"{MIN_HMAC_KEY_LENGTH} random characters so pseudonyms cannot be reversed "
                "by guessing the key."
            )
        return cls(
            model_tag=environ.get(MODEL_TAG_ENV, "").strip() or DEFAULT_MODEL_TAG,
            audit_url=environ.get(AUDIT_URL_ENV, "").strip() or default_audit_url(environ),
            hmac_key=key.encode("utf-8"),
            api_keys=ApiKeys.from_env(environ),
            max_body_bytes=_positive_int(environ, MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES),
            threads=_positive_int(environ, THREADS_ENV, 2),
            max_batch=_positive_int(environ, MAX_BATCH_ENV, DEFAULT_MAX_BATCH),
            cpu_affinity=_switch(environ, CPU_AFFINITY_ENV),
            demo=demo,
        )
