"""``OIDCUserAuthentication`` in JWT mode: tokens signed by the provider's JWKS keys."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from controllers.auth.oidc import KEYS_REFRESHING, NOT_IN_GROUP
from controllers.errors import AuthenticationFailed, Unavailable
from tests.conftest import eventually
from tests.identity.conftest import (
    assert_forbidden,
    assert_refused,
    assert_works,
    build_auth,
    sign_in,
    stable_sub,
    user_row,
)
from tests.identity.fake_provider import ec_key, rsa_key

CONFIG = "identity-oidc-jwt.toml"


def claims(username: str | None = None, **overrides) -> dict:
    username = username or f"jwt{secrets.token_hex(4)}"
    return {"sub": stable_sub(username), "aud": "uws", "preferred_username": username,
            "email": f"{username}@example.org", "given_name": "Grace",
            "family_name": "Hopper", "groups": ["researchers"], **overrides}


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_rs256_and_es256_tokens(jwt_client, provider) -> None:
    name = f"grace{secrets.token_hex(3)}"
    key = await assert_works(jwt_client, provider.sign(claims(name), provider.rsa))
    assert await user_row(name) == {"username": name, "email": f"{name}@example.org",
                                    "first_name": "Grace", "last_name": "Hopper"}
    # The same person with an EC-signed token: the same UWS key.
    assert await assert_works(jwt_client, provider.sign(claims(name), provider.ec)) == key


async def test_time_claims(jwt_client, provider) -> None:
    await assert_refused(jwt_client, provider.sign(claims(), provider.rsa, lifetime=-60))
    future = provider.sign(claims(nbf=int(time.time()) + 600), provider.rsa)
    await assert_refused(jwt_client, future)
    no_exp = jwt.encode({**claims(), "iss": provider.issuer}, provider.rsa.private,
                        algorithm="RS256", headers={"kid": "rsa-1", "typ": "at+jwt"})
    await assert_refused(jwt_client, no_exp)


async def test_wrong_audience_issuer_or_group(jwt_client, provider) -> None:
    await assert_refused(jwt_client, provider.sign(claims(aud="another-api"), provider.rsa))
    await assert_refused(jwt_client,
                         provider.sign(claims(iss="https://evil.example"), provider.ec))
    await assert_forbidden(jwt_client, provider.sign(claims(groups=["staff"]), provider.rsa),
                           NOT_IN_GROUP)


async def test_bad_signature(jwt_client, provider) -> None:
    impostor = rsa_key("rsa-1")  # claims the provider's kid, signs with another key
    await assert_refused(jwt_client, provider.sign(claims(), impostor))
    header, payload, _ = provider.sign(claims(), provider.rsa).split(".")
    _, _, other_sig = provider.sign(claims(), provider.rsa).split(".")
    await assert_refused(jwt_client, f"{header}.{payload}.{other_sig}")


async def test_algorithm_attacks(jwt_client, provider) -> None:
    unsigned = f"{b64({'alg': 'none', 'kid': 'rsa-1'})}.{b64({**claims(), 'exp': 2**40})}."
    await assert_refused(jwt_client, unsigned)
    # HS256 keyed with the provider's public key, which anyone can fetch.
    public_pem = provider.rsa.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    forged = ".".join([
        b64({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}),
        b64({**claims(), "iss": provider.issuer, "exp": 2**40}),
    ])
    sig = hmac.new(public_pem, forged.encode(), hashlib.sha256).digest()
    forged += "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    await assert_refused(jwt_client, forged)
    # An RS256 header on the EC key's kid: the key's own algorithm wins.
    await assert_refused(jwt_client, provider.sign(claims(), provider.rsa,
                                                   headers={"kid": "ec-1"}))
    await assert_refused(jwt_client, "not-a-jwt")


async def test_unknown_kid_refetches_jwks_at_a_limited_rate(jwt_client, provider) -> None:
    jwks = jwt_client.controllers.api_auth.jwks
    await assert_works(jwt_client, provider.sign(claims(), provider.ec))  # JWKS cached
    stranger = ec_key("never-published")
    await asyncio.sleep(0.6)  # past the config's 0.5 s refetch limit
    fetches = jwks.fetches
    # The first unknown kid refetches at once; the JWKS does not have it: refused.
    await assert_refused(jwt_client, provider.sign(claims(), stranger))
    # The next ones, before a refetch is allowed again: "try again shortly", not a 401
    # that would make a client drop a token signed with a key rotated in meanwhile.
    for _ in range(2):
        r = await sign_in(jwt_client, provider.sign(claims(), stranger))
        assert r.status_code == 503, r.text
        assert r.json() == {"success": False, "message": KEYS_REFRESHING}
    # Three unknown-kid tokens in quick succession: the JWKS was fetched again, once.
    assert jwks.fetches - fetches == 1


async def test_rotated_key_is_picked_up(jwt_client, provider) -> None:
    await assert_works(jwt_client, provider.sign(claims(), provider.rsa))  # JWKS cached
    rotated = rsa_key(f"rsa-{secrets.token_hex(3)}")
    provider.published.append(rotated)
    token = provider.sign(claims(), rotated)

    async def accepted() -> bool:  # once the refetch rate limit allows it
        return (await sign_in(jwt_client, token)).status_code == 200

    await eventually(accepted, timeout=10, interval=0.2)


async def test_id_token_is_no_access_token(jwt_client, provider) -> None:
    # Same issuer, keys and (when the portal is our client) aud: only typ tells them apart.
    name = f"ida{secrets.token_hex(3)}"
    await assert_refused(jwt_client, provider.sign(claims(name), provider.rsa,
                                                   headers={"typ": "JWT"}))
    untyped = jwt.encode({**claims(name), "iss": provider.issuer, "exp": int(time.time()) + 60},
                         provider.rsa.private, algorithm="RS256", headers={"kid": "rsa-1"})
    assert jwt.get_unverified_header(untyped).get("typ") == "JWT"  # PyJWT's default
    await assert_refused(jwt_client, untyped)
    await assert_works(jwt_client, provider.sign(claims(name), provider.rsa,
                                                 headers={"typ": "application/at+jwt"}))


async def test_typ_not_required_when_configured(provider) -> None:
    auth = build_auth(CONFIG, provider.issuer, require_at_jwt_typ=False)
    token = provider.sign(claims("jill"), provider.ec, headers={"typ": "JWT"})
    info = await auth.identify({"auth_token": token}, _no_client)
    assert (info.username, info.issuer, info.subject) == ("jill", provider.issuer,
                                                          stable_sub("jill"))


async def test_rotated_key_is_503_until_a_refetch_is_allowed(provider) -> None:
    auth = build_auth(CONFIG, provider.issuer, jwks_min_refetch_seconds=30)
    await auth.identify({"auth_token": provider.sign(claims(), provider.rsa)}, _no_client)
    rotated = rsa_key(f"rsa-{secrets.token_hex(3)}")
    provider.published.append(rotated)
    try:
        token = provider.sign(claims(), rotated)
        with pytest.raises(Unavailable) as caught:
            await auth.identify({"auth_token": token}, _no_client)
        assert caught.value.user_message == KEYS_REFRESHING
        auth.jwks.fetched_at -= 30  # the refetch limit has passed
        assert (await auth.identify({"auth_token": token}, _no_client)).subject
    finally:
        provider.published.remove(rotated)


async def test_withdrawn_key_stops_being_trusted_after_max_age(provider) -> None:
    auth = build_auth(CONFIG, provider.issuer, jwks_max_age_seconds=1)
    withdrawn = ec_key(f"ec-{secrets.token_hex(3)}")
    provider.published.append(withdrawn)
    token = provider.sign(claims(), withdrawn)
    await auth.identify({"auth_token": token}, _no_client)
    provider.published.remove(withdrawn)
    fetches = auth.jwks.fetches
    # Within max age the keys are not fetched again for a known kid ...
    await auth.identify({"auth_token": token}, _no_client)
    assert auth.jwks.fetches == fetches
    await asyncio.sleep(1.1)
    # ... past it they are, and the key the provider withdrew is gone.
    with pytest.raises(AuthenticationFailed):
        await auth.identify({"auth_token": token}, _no_client)
    assert auth.jwks.fetches == fetches + 1


async def _no_client(_: str) -> bool:
    return False
