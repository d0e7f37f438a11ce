"""CDS Hooks bearer-JWT authentication (CDS Hooks 2.0 §"Trusting CDS Clients"; interop.md §1.6).

Every request an EHR sends (discovery included) carries ``Authorization: Bearer <JWT>`` signed
with the EHR's private key. :func:`verify_jwt` checks, in this order:

1. header: ``alg`` asymmetric and allowed (ES384/RS384 as the spec recommends, ES256/RS256
   also accepted; ``none`` and ``HS*`` are refused), ``kid`` present, ``typ`` = ``JWT``;
2. ``iss`` is on the allow-list; the key set is the one configured for that issuer — a JWKS
   object, or a JWKS URL fetched once and cached (:class:`JwksCache`). A ``jku`` header must
   equal the allow-listed URL: an arbitrary ``jku`` is never fetched (SSRF / key injection);
3. signature with the key whose ``kid`` matches (PyJWT);
4. ``aud`` contains this service's URL, ``exp`` not passed, ``iat`` not in the future (both
   with ``leeway`` seconds of clock skew), ``jti`` present;
5. ``jti`` not seen before from this issuer (:class:`ReplayCache`, kept until ``exp``).

Every failure raises :class:`AuthError` (→ 401) with a one-paragraph message that says what
was wrong and what the client must change; messages never echo the token.

Replay cache and several workers
--------------------------------
:class:`ReplayCache` is in-process memory. With several server workers (BentoML ``workers``
> 1, several replicas) a token replayed to *another* worker is not detected, and a restart
forgets all ``jti``s. For production, pass an object with the same ``check_and_add(key,
expires_at)`` method backed by a shared store (Redis ``SET key 1 NX EXAT exp``, or a unique
index in the audit database), or run one worker. The cache is bounded (``max_entries``);
when full it refuses new tokens rather than forgetting unexpired ones (fail closed).

Switching it off for the demo: ``PAINPLAN_CDS_AUTH=off`` makes :func:`authenticate` return
``None`` without looking at the header. :meth:`AuthConfig.from_env` reads the allow-list from
``PAINPLAN_CDS_ISSUERS`` (JSON ``{"iss": "https://ehr/.well-known/jwks.json" | {jwks}}``, or a
path to a JSON file holding that object).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt

from features.errors import ConfigError, PainplanError

log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS = ("ES384", "RS384", "ES256", "RS256")
DEFAULT_LEEWAY_S = 30.0
JWKS_TTL_S = 3600.0  # re-read an issuer's key set hourly ...
JWKS_MIN_REFRESH_S = 60.0  # ... or sooner for an unknown kid (key rotation), at most once a minute
JWKS_TIMEOUT_S = 3.0
AUTH_ENV = "PAINPLAN_CDS_AUTH"
ISSUERS_ENV = "PAINPLAN_CDS_ISSUERS"


class AuthError(PainplanError):
    """The request's bearer JWT was missing or did not verify; answer 401."""

    status = 401


class ReplayCache:
    """Thread-safe in-memory ``jti`` store: remembers each key until its ``exp``."""

    def __init__(self, max_entries: int = 100_000):
        self.max_entries = max_entries
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check_and_add(self, key: str, expires_at: float, now: float | None = None) -> bool:
        """True if ``key`` is new (and remember it); False if it was seen and has not expired."""
        now = time.time() if now is None else now
        with self._lock:
            if key in self._seen and self._seen[key] > now:
                return False
            if len(self._seen) >= self.max_entries:
                self._seen = {k: e for k, e in self._seen.items() if e > now}
                if len(self._seen) >= self.max_entries:
                    raise AuthError(
                        "the replay cache is full of unexpired tokens, so this token cannot be "
                        "checked for reuse and is refused; retry later, and ask the EHR to keep "
                        "JWT lifetimes short (exp a few minutes after iat)"
                    )
            self._seen[key] = float(expires_at)
            return True

    @property
    def size(self) -> int:
        """Entries held (no ``__len__``: an empty cache must not be falsy in ``cache or …``)."""
        return len(self._seen)


Fetcher = Callable[[str], dict]


def _httpx_get_json(url: str) -> dict:
    response = httpx.get(url, timeout=JWKS_TIMEOUT_S, follow_redirects=False)
    response.raise_for_status()
    return response.json()


@dataclass
class JwksCache:
    """JWKS documents by URL: fetched on first use, cached for ``ttl`` seconds, re-fetched early
    (at most every ``min_refresh`` seconds) when a token names a ``kid`` the cached set lacks."""

    fetch: Fetcher = _httpx_get_json
    ttl: float = JWKS_TTL_S
    min_refresh: float = JWKS_MIN_REFRESH_S
    _store: dict[str, tuple[float, dict]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, url: str, kid: str | None = None) -> dict:
        now = time.time()
        with self._lock:
            cached = self._store.get(url)
        if cached is not None:
            fetched_at, jwks = cached
            fresh = now - fetched_at < self.ttl
            has_kid = kid is None or any(k.get("kid") == kid for k in jwks.get("keys", []))
            if fresh and (has_kid or now - fetched_at < self.min_refresh):
                return jwks
        try:
            jwks = self.fetch(url)
        except (httpx.HTTPError, OSError, ValueError) as err:  # cannot get the keys
            if cached is not None:
                log.warning(
                    "cds auth: JWKS refresh failed (%s); using the cached key set",
                    type(err).__name__,
                )
                return cached[1]
            raise AuthError(
                f"the key set of the token's issuer could not be fetched from its allow-listed "
                f"JWKS URL ({type(err).__name__}); the signature cannot be checked, so the request "
                "is refused. Check that the URL in the issuer allow-list is reachable"
            ) from err
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise AuthError(
                "the issuer's JWKS URL did not return a JSON Web Key Set ({'keys': [...]}); fix "
                "the URL in the issuer allow-list"
            )
        with self._lock:
            self._store[url] = (now, jwks)
        return jwks


@dataclass
class AuthConfig:
    """What :func:`authenticate` needs; build once per process."""

    allowed_issuers: Mapping[str, dict | str]
    replay_cache: ReplayCache = field(default_factory=ReplayCache)
    jwks_cache: JwksCache = field(default_factory=JwksCache)
    leeway: float = DEFAULT_LEEWAY_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AuthConfig:
        """Allow-list from ``PAINPLAN_CDS_ISSUERS`` (JSON object or a path to a JSON file)."""
        env = os.environ if env is None else env
        raw = (env.get(ISSUERS_ENV) or "").strip()
        if not raw:
            return cls(allowed_issuers={})
        text = raw
        if not raw.startswith("{"):
            try:
                text = Path(raw).read_text(encoding="utf-8")
            except OSError as err:
                raise ConfigError(
                    f"{ISSUERS_ENV} is neither a JSON object nor a readable file ({err}); set it "
                    'to {"<iss>": "<jwks url>"} or to the path of a file holding that object'
                ) from err
        try:
            issuers = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{ISSUERS_ENV} is not valid JSON ({err.msg}); fix the value"
            ) from err
        if not isinstance(issuers, dict) or not all(
            isinstance(v, str | dict) for v in issuers.values()
        ):
            raise ConfigError(f"{ISSUERS_ENV} must map each issuer to a JWKS URL or a JWKS object")
        return cls(allowed_issuers=issuers)


def auth_enabled(env: Mapping[str, str] | None = None) -> bool:
    """False only when ``PAINPLAN_CDS_AUTH`` is ``off`` (also ``false``/``0``/``no``)."""
    env = os.environ if env is None else env
    return (env.get(AUTH_ENV) or "on").strip().lower() not in ("off", "false", "0", "no")


def authenticate(
    authorization: str | None,
    *,
    audience: str | Sequence[str],
    config: AuthConfig | None,
    env: Mapping[str, str] | None = None,
) -> dict | None:
    """Check an ``Authorization`` header value. Returns the JWT claims, or ``None`` when
    authentication is switched off (``PAINPLAN_CDS_AUTH=off``). Raises :class:`AuthError`."""
    if not auth_enabled(env):
        return None
    if config is None or not config.allowed_issuers:
        raise AuthError(
            "CDS Hooks authentication is on but no trusted issuers are configured, so every "
            f"request is refused; set {ISSUERS_ENV} to the EHR's issuer and JWKS URL, or set "
            f"{AUTH_ENV}=off for a local demo"
        )
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(
            "the request has no 'Authorization: Bearer <JWT>' header; a CDS client must sign "
            "each request with its private key (CDS Hooks security section)"
        )
    return verify_jwt(
        token.strip(),
        allowed_issuers=config.allowed_issuers,
        audience=audience,
        replay_cache=config.replay_cache,
        jwks_cache=config.jwks_cache,
        leeway=config.leeway,
    )


def verify_jwt(
    token: str,
    *,
    allowed_issuers: Mapping[str, dict | str],
    audience: str | Sequence[str],
    replay_cache: ReplayCache,
    jwks_cache: JwksCache | None = None,
    leeway: float = DEFAULT_LEEWAY_S,
) -> dict:
    """Verify a CDS client's bearer JWT and return its claims (see the module docstring).

    Parameters
    ----------
    allowed_issuers : mapping
        ``iss`` → a JWKS object (``{"keys": [...]}``) or the issuer's JWKS URL.
    audience : str or sequence of str
        This service's URL as the client calls it, e.g.
        ``https://cds.example.org/cds-services/painplan-patient-view``.
    replay_cache : ReplayCache (or any object with ``check_and_add(key, expires_at)``)
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as err:
        raise AuthError(
            "the bearer token is not a well-formed JWT (three base64url parts); send the signed "
            "JWT the CDS Hooks specification describes"
        ) from err
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise AuthError(
            f"JWT algorithm {alg!r} is not accepted: CDS Hooks requires an asymmetric signature "
            f"({', '.join(ALLOWED_ALGORITHMS)}; ES384 or RS384 recommended); 'none' and HMAC "
            "(HS*) are refused"
        )
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AuthError(
            "the JWT header has no 'kid'; CDS Hooks requires it to pick the signing key"
        )
    if str(header.get("typ", "")).upper() != "JWT":
        raise AuthError("the JWT header 'typ' must be 'JWT' (CDS Hooks security section)")
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as err:
        raise AuthError("the JWT payload cannot be read; send a signed JSON payload") from err
    iss = unverified.get("iss")
    if not isinstance(iss, str) or iss not in allowed_issuers:
        raise AuthError(
            f"JWT issuer {iss!r} is not on this service's allow-list of trusted CDS clients; "
            "ask the service operator to register the EHR's issuer and JWKS URL"
        )
    keys_source = allowed_issuers[iss]
    jku = header.get("jku")
    if isinstance(keys_source, str):
        if jku is not None and jku != keys_source:
            raise AuthError(
                "the JWT 'jku' header is not the JWKS URL allow-listed for its issuer; this "
                "service never fetches keys from an unlisted URL"
            )
        jwks = (jwks_cache or JwksCache()).get(keys_source, kid)
    else:
        jwks = keys_source  # statically configured keys; a jku header is ignored, never fetched
    jwk = next((k for k in jwks.get("keys", []) if k.get("kid") == kid), None)
    if jwk is None:
        raise AuthError(
            f"no key with kid {kid!r} in the issuer's key set; the EHR must publish the key it "
            "signs with (or the allow-list holds an outdated key set)"
        )
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
    except jwt.PyJWTError as err:
        raise AuthError(
            f"the key {kid!r} in the issuer's key set does not fit algorithm {alg}; the EHR's "
            "JWKS and its signing algorithm disagree"
        ) from err
    try:
        claims = jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            audience=audience,
            issuer=iss,
            leeway=leeway,
            options={"require": ["iss", "aud", "exp", "iat", "jti"]},
        )
    except jwt.ExpiredSignatureError as err:
        raise AuthError(
            "the JWT has expired ('exp' is in the past); the EHR must sign a fresh token for each request"
        ) from err
    except jwt.InvalidAudienceError as err:
        raise AuthError(
            "the JWT 'aud' does not name this service's URL; the audience must be exactly the "
            "URL the EHR is calling (e.g. https://<host>/cds-services/<id>)"
        ) from err
    except jwt.ImmatureSignatureError as err:
        raise AuthError("the JWT 'iat' lies in the future; check the EHR's clock") from err
    except jwt.MissingRequiredClaimError as err:
        raise AuthError(
            f"the JWT lacks the required claim '{err.claim}' (CDS Hooks requires iss, aud, exp, "
            "iat and jti)"
        ) from err
    except jwt.InvalidSignatureError as err:
        raise AuthError(
            "the JWT signature does not verify with the issuer's published key; the token was "
            "altered or signed with another key"
        ) from err
    except jwt.PyJWTError as err:
        raise AuthError(
            f"the JWT was rejected ({type(err).__name__}); send a valid signed token"
        ) from err
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise AuthError("the JWT 'jti' must be a non-empty string (a one-time nonce)")
    if not replay_cache.check_and_add(f"{iss}|{jti}", float(claims["exp"]) + leeway):
        raise AuthError(
            "this JWT was already used ('jti' seen before): tokens are single-use; the EHR must "
            "sign a new token for each request"
        )
    return claims


__all__ = [
    "ALLOWED_ALGORITHMS",
    "AuthConfig",
    "AuthError",
    "JwksCache",
    "ReplayCache",
    "auth_enabled",
    "authenticate",
    "verify_jwt",
]
