"""CDS Hooks bearer-JWT verification (recommender/cds_auth.py; interop.md §1.6).

Keys are generated in the test with ``cryptography``: EC P-384 for ES384 and RSA for RS384.
"""

from __future__ import annotations

import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from features.errors import ConfigError
from recommender.cds_auth import (
    AuthConfig,
    AuthError,
    JwksCache,
    ReplayCache,
    auth_enabled,
    authenticate,
    verify_jwt,
)

ISS = "https://ehr.example.org"
AUD = "https://cds.example.org/cds-services/painplan-patient-view"
JKU = "https://ehr.example.org/.well-known/jwks.json"


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk_of(private_key, kid: str) -> dict:
    public = private_key.public_key()
    algo = (
        jwt.algorithms.ECAlgorithm
        if isinstance(public, ec.EllipticCurvePublicKey)
        else jwt.algorithms.RSAAlgorithm
    )
    return {**algo.to_jwk(public, as_dict=True), "kid": kid}


def token(private_key, *, alg="ES384", kid="k1", headers=None, **claims) -> str:
    now = int(time.time())
    payload = {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(
        payload, private_key, algorithm=alg, headers={"kid": kid, "typ": "JWT", **(headers or {})}
    )


@pytest.fixture
def issuers(ec_key, rsa_key):
    return {ISS: {"keys": [jwk_of(ec_key, "k1"), jwk_of(rsa_key, "r1")]}}


def verify(tok, issuers, cache=None, **kw):
    return verify_jwt(
        tok, allowed_issuers=issuers, audience=AUD, replay_cache=cache or ReplayCache(), **kw
    )


def test_valid_es384_and_rs384_tokens(ec_key, rsa_key, issuers):
    claims = verify(token(ec_key), issuers)
    assert claims["iss"] == ISS and claims["aud"] == AUD
    assert verify(token(rsa_key, alg="RS384", kid="r1"), issuers)["iss"] == ISS
    # aud may be an array that contains this service's URL
    assert verify(token(ec_key, aud=[AUD, "https://other"]), issuers)


def test_expired_token(ec_key, issuers):
    old = int(time.time()) - 3600
    with pytest.raises(AuthError, match="expired"):
        verify(token(ec_key, iat=old - 60, exp=old), issuers)


def test_wrong_issuer(ec_key, issuers):
    with pytest.raises(AuthError, match="not on this service's allow-list"):
        verify(token(ec_key, iss="https://attacker.example"), issuers)


def test_replayed_token(ec_key, issuers):
    cache = ReplayCache()
    tok = token(ec_key)
    verify(tok, issuers, cache)
    with pytest.raises(AuthError, match="already used"):
        verify(tok, issuers, cache)
    verify(token(ec_key), issuers, cache)  # a fresh jti is fine


def test_bad_signature(ec_key, issuers):
    impostor = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(AuthError, match="signature does not verify"):
        verify(token(impostor), issuers)  # same kid, other key
    head, body, sig = token(ec_key).split(".")
    tampered = json.loads(jwt.utils.base64url_decode(body))
    tampered["iss"] = ISS
    tampered["sub"] = "admin"
    forged = ".".join(
        [head, jwt.utils.base64url_encode(json.dumps(tampered).encode()).decode(), sig]
    )
    with pytest.raises(AuthError, match="signature"):
        verify(forged, issuers)


def test_wrong_audience(ec_key, issuers):
    with pytest.raises(AuthError, match="'aud'"):
        verify(token(ec_key, aud="https://cds.example.org/cds-services/other"), issuers)


@pytest.mark.parametrize("missing", ["jti", "iat", "exp", "aud"])
def test_required_claims(ec_key, issuers, missing):
    with pytest.raises(AuthError):
        verify(token(ec_key, **{missing: None}), issuers)


def test_header_rules(ec_key, issuers):
    with pytest.raises(AuthError, match="not accepted"):
        verify(
            jwt.encode(
                {"iss": ISS},
                "shared-secret-of-at-least-32-bytes!!",
                algorithm="HS256",
                headers={"kid": "k1"},
            ),
            issuers,
        )
    unsigned = jwt.encode({"iss": ISS, "aud": AUD}, None, algorithm="none", headers={"kid": "k1"})
    with pytest.raises(AuthError, match="not accepted"):
        verify(unsigned, issuers)
    with pytest.raises(AuthError, match="kid"):
        verify(jwt.encode({"iss": ISS}, ec_key, algorithm="ES384"), issuers)
    with pytest.raises(AuthError, match="typ"):
        verify(token(ec_key, headers={"typ": "at+jwt"}), issuers)
    with pytest.raises(AuthError, match="no key with kid"):
        verify(token(ec_key, kid="unknown"), issuers)
    with pytest.raises(AuthError, match="well-formed"):
        verify("not-a-jwt", issuers)


def test_jku_is_allow_listed_fetched_once_and_cached(ec_key):
    fetched = []

    def fetch(url):
        fetched.append(url)
        return {"keys": [jwk_of(ec_key, "k1")]}

    cache = JwksCache(fetch=fetch)
    issuers = {ISS: JKU}
    for _ in range(3):
        verify(token(ec_key, headers={"jku": JKU}), issuers, jwks_cache=cache)
    assert fetched == [JKU]
    with pytest.raises(AuthError, match="jku"):
        verify(
            token(ec_key, headers={"jku": "https://attacker.example/jwks.json"}),
            issuers,
            jwks_cache=cache,
        )
    assert fetched == [JKU]  # the unlisted URL was never fetched
    # an unknown kid triggers at most one early refresh per min_refresh window
    with pytest.raises(AuthError, match="no key with kid"):
        verify(token(ec_key, kid="rotated"), issuers, jwks_cache=cache)
    assert fetched == [JKU]


def test_unreachable_jwks_url_fails_closed(ec_key):
    def fetch(url):
        raise OSError("connection refused")

    with pytest.raises(AuthError, match="could not be fetched"):
        verify(token(ec_key), {ISS: JKU}, jwks_cache=JwksCache(fetch=fetch))


def test_authenticate_header_switch_and_config(ec_key, issuers):
    config = AuthConfig(allowed_issuers=issuers)
    claims = authenticate(f"Bearer {token(ec_key)}", audience=AUD, config=config, env={})
    assert claims["iss"] == ISS
    assert authenticate(None, audience=AUD, config=None, env={"PAINPLAN_CDS_AUTH": "off"}) is None
    assert not auth_enabled({"PAINPLAN_CDS_AUTH": "OFF"}) and auth_enabled({})
    with pytest.raises(AuthError, match="Authorization: Bearer"):
        authenticate("Basic abc", audience=AUD, config=config, env={})
    with pytest.raises(AuthError, match="no trusted issuers"):
        authenticate(
            f"Bearer {token(ec_key)}", audience=AUD, config=AuthConfig(allowed_issuers={}), env={}
        )


def test_auth_config_from_env(tmp_path):
    cfg = AuthConfig.from_env({"PAINPLAN_CDS_ISSUERS": json.dumps({ISS: JKU})})
    assert cfg.allowed_issuers == {ISS: JKU}
    path = tmp_path / "issuers.json"
    path.write_text(json.dumps({ISS: {"keys": []}}))
    assert AuthConfig.from_env({"PAINPLAN_CDS_ISSUERS": str(path)}).allowed_issuers == {
        ISS: {"keys": []}
    }
    assert AuthConfig.from_env({}).allowed_issuers == {}
    with pytest.raises(ConfigError):
        AuthConfig.from_env({"PAINPLAN_CDS_ISSUERS": "{not json"})
    with pytest.raises(ConfigError):
        AuthConfig.from_env({"PAINPLAN_CDS_ISSUERS": str(tmp_path / "absent.json")})


def test_replay_cache_expiry_and_bound():
    cache = ReplayCache(max_entries=2)
    assert cache.check_and_add("a", 100, now=0) and not cache.check_and_add("a", 100, now=50)
    assert cache.check_and_add("a", 300, now=150)  # expired entries may be reused
    assert cache.check_and_add("b", 400, now=160)
    with pytest.raises(AuthError, match="replay cache is full"):
        cache.check_and_add("c", 500, now=170)
    assert cache.check_and_add("c", 500, now=450)  # after expiry the space is reclaimed
