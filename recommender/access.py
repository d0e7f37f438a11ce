"""API keys and roles of the HTTP service (CONTRACT §8).

Keys come from ``PAINPLAN_API_KEYS`` (``"clinician:KEY1,auditor:KEY2"``) and, optionally,
the file named by ``PAINPLAN_API_KEYS_FILE`` (the same ``role:key`` pairs, separated by
commas or newlines; ``#`` starts a comment). A key may be listed under both roles.

Only the SHA-256 digest of each key is kept in memory, and a presented key is compared
against every digest with :func:`hmac.compare_digest` (no early exit), so neither a memory
dump nor response timing gives a key away.

=============  ==========================================================
role           may
=============  ==========================================================
``clinician``  ``POST /recommend``, ``POST /explain``, ``POST /outcomes``
``auditor``    ``GET /audit``, ``GET /audit/{request_id}``, ``GET /model``
=============  ==========================================================
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from features.errors import ConfigError, PainplanError

Role = Literal["clinician", "auditor"]
ROLES: tuple[Role, ...] = ("clinician", "auditor")
KEYS_ENV = "PAINPLAN_API_KEYS"
KEYS_FILE_ENV = "PAINPLAN_API_KEYS_FILE"
# Shorter keys can be guessed online; 16 characters of a random token is ~96 bits.
MIN_KEY_LENGTH = 16


class AccessDenied(PainplanError):
    """A request without a valid key (``status`` 401) or with the wrong role (403)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys, as (SHA-256 digest, role) pairs."""

    entries: tuple[tuple[bytes, Role], ...]

    @classmethod
    def parse(cls, text: str, *, source: str = KEYS_ENV) -> ApiKeys:
        """Parse ``role:key`` pairs separated by commas or newlines (``#`` comments)."""
        entries: list[tuple[bytes, Role]] = []
        lines = (line.split("#", 1)[0] for line in text.splitlines())
        for n, item in enumerate(p.strip() for line in lines for p in line.split(",")):
            if not item:
                continue
            role, sep, key = (part.strip() for part in item.partition(":"))
            if not sep or role not in ROLES:
                raise ConfigError(
                    f"{source}: entry {n + 1} is not 'role:key' with role clinician or "
                    f"auditor (got role {role!r}); write e.g. "
                    "'clinician:<random key>,auditor:<another random key>'."
                )
            if len(key) < MIN_KEY_LENGTH:
                raise ConfigError(
                    f"{source}: the {role} key of entry {n + 1} has {len(key)} characters; "
                    f"use at least {MIN_KEY_LENGTH} random characters, e.g. from "
                    "'python -c \"import secrets; print(secrets.token_urlsafe(24))\"'."
                )
            entries.append((_digest(key), role))  # type: ignore[arg-type]
        return cls(tuple(entries))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ApiKeys:
        """Keys from ``PAINPLAN_API_KEYS`` plus ``PAINPLAN_API_KEYS_FILE``; at least one."""
        found = list(cls.parse(environ.get(KEYS_ENV, "")).entries)
        path = environ.get(KEYS_FILE_ENV, "").strip()
        if path:
            try:
                text = Path(path).expanduser().read_text(encoding="utf-8")
            except OSError as err:
                raise ConfigError(
                    f"{KEYS_FILE_ENV}={path!r} cannot be read ({err.strerror}); point it at "
                    "a readable file of 'role:key' lines or unset it."
                ) from err
            found += cls.parse(text, source=path).entries
        if not found:
            raise ConfigError(
                f"no API keys are configured, so nobody could use the service: set {KEYS_ENV}"
                "='clinician:<key>,auditor:<key>' (or a file of such lines in "
                f"{KEYS_FILE_ENV}); 'painplan demo' generates a pair for you."
            )
        return cls(tuple(found))

    def roles_of(self, key: str) -> frozenset[Role]:
        """Roles of a presented key (empty when unknown); compares every digest."""
        presented = _digest(key)
        roles: set[Role] = set()
        for digest, role in self.entries:
            if hmac.compare_digest(presented, digest):
                roles.add(role)
        return frozenset(roles)

    def require(self, authorization: str | None, role: Role) -> None:
        """Check an ``Authorization`` header for ``role``; raise :class:`AccessDenied`."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AccessDenied(
                401,
                "missing or malformed Authorization header; send 'Authorization: Bearer "
                f"<key>' with a {role} key from {KEYS_ENV}.",
            )
        roles = self.roles_of(key.strip())
        if not roles:
            raise AccessDenied(
                401, f"the API key is not known to this service; use a {role} key from {KEYS_ENV}."
            )
        if role not in roles:
            have = " and ".join(sorted(roles))
            raise AccessDenied(
                403,
                f"this endpoint needs the {role} role, but the key belongs to the {have} "
                f"role; use a {role} key.",
            )

    def __repr__(self) -> str:  # never show digests in logs or tracebacks
        counts = {r: sum(1 for _, role in self.entries if role == r) for r in ROLES}
        return f"ApiKeys({', '.join(f'{r}={n}' for r, n in counts.items())})"


def key_pairs(pairs: Iterable[tuple[Role, str]]) -> str:
    """Format (role, key) pairs as a ``PAINPLAN_API_KEYS`` value."""
    return ",".join(f"{role}:{key}" for role, key in pairs)
