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
from cryptography.hazmat.primitives import serialization

from controllers.auth.oidc import NOT_IN_GROUP
from tests.conftest import eventually
from tests.identity.conftest import (
    assert_forbidden,
    assert_refused,
    assert_works,
    sign_in,
    user_row,
)
from tests.identity.fake_provider import ec_key, rsa_key


def claims(username: str | None = None, **overrides) -> dict:
    username = username or f"jwt{secrets.token_hex(4)}"
    return {"sub": secrets.token_hex(8), "aud": "uws", "preferred_username": username,
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
                        algorithm="RS256", headers={"kid": "rsa-1"})
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
    for _ in range(3):
        await assert_refused(jwt_client, provider.sign(claims(), stranger))
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
