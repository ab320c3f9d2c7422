"""``POST /tokens/`` and the ``UWS-Authorization`` scheme, line by line of the contract."""

from __future__ import annotations

import secrets

from tests.conftest import make_user_token


async def test_token_flow_creates_user_and_returns_same_key(client, api_client_key) -> None:
    name = f"alice{secrets.token_hex(3)}"
    first = await make_user_token(client, api_client_key, name)
    second = await make_user_token(client, api_client_key, name)
    assert first == second and len(first) == 40
    r = await client.get("/workspaces/", headers={"UWS-Authorization": f"Token {first}"})
    assert r.status_code == 200


async def test_token_success_envelope(client, api_client_key) -> None:
    r = await client.post("/tokens/", json={
        "client_token": api_client_key,
        "user_info": {"username": f"bob{secrets.token_hex(3)}", "email": "bob@example.org"},
    })
    body = r.json()
    assert r.status_code == 200
    assert body["success"] is True and body["message"] == "Successful authentication."


async def test_missing_client_token(client) -> None:
    r = await client.post("/tokens/", json={"user_info": {"username": "x", "email": "x@y"}})
    assert r.status_code == 400
    assert r.json() == {
        "success": False,
        "message": "Missing client_token. Please have admin generate a token for you.",
    }


async def test_empty_body_is_missing_client_token(client) -> None:
    r = await client.post("/tokens/")
    assert r.status_code == 400
    assert r.json()["message"].startswith("Missing client_token.")


async def test_missing_user_info(client, api_client_key) -> None:
    r = await client.post("/tokens/", json={"client_token": api_client_key})
    assert r.status_code == 400
    assert r.json()["message"] == "Missing user_info. Please provide user_info to get user_token."


async def test_unknown_client_token(client) -> None:
    r = await client.post("/tokens/", json={
        "client_token": "nope", "user_info": {"username": "x", "email": "x@example.org"},
    })
    assert r.status_code == 401
    assert r.json()["message"] == "Incorrect authentication credentials."


async def test_user_key_is_not_an_api_client(client, api_client_key, user_token) -> None:
    r = await client.post("/tokens/", json={
        "client_token": user_token, "user_info": {"username": "x", "email": "x@example.org"},
    })
    assert r.status_code == 401
    assert r.json()["message"] == "Incorrect authentication credentials."


async def test_user_info_without_username_or_email(client, api_client_key) -> None:
    for info in ({"email": "a@b"}, {"username": "abc"}, {"username": "", "email": "a@b"}):
        r = await client.post("/tokens/", json={"client_token": api_client_key,
                                                "user_info": info})
        assert r.status_code == 401, info
        assert r.json()["message"] == "Incorrect authentication credentials."


async def test_invalid_json(client) -> None:
    r = await client.post("/tokens/", content=b"{nope",
                          headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["message"].startswith("Invalid JSON:")


async def test_missing_auth_header(client) -> None:
    r = await client.get("/workspaces/")
    assert r.status_code == 401
    assert r.json() == {"success": False,
                        "message": "Authentication credentials were not provided."}


async def test_malformed_auth_header(client) -> None:
    for value in ("Token", "Token a b", "abc"):
        r = await client.get("/workspaces/", headers={"UWS-Authorization": value})
        assert r.status_code == 401, value
        assert r.json()["message"] == "Invalid auth header format."


async def test_unknown_token_everywhere_even_public(client) -> None:
    for path in ("/workspaces/", "/job_types/", "/parameters/", "/status/"):
        r = await client.get(path, headers={"UWS-Authorization": "Token deadbeef"})
        assert r.status_code == 401, path
        assert r.json()["message"] == "Invalid token provided."


async def test_method_not_allowed(client, auth) -> None:
    r = await client.post("/job_types/", headers=auth)
    assert r.status_code == 405
    assert r.json() == {"success": False, "message": 'Method "POST" not allowed.'}


async def test_get_without_slash_redirects(client, auth) -> None:
    r = await client.get("/workspaces", headers=auth, follow_redirects=False)
    assert r.status_code == 301
    assert r.headers["location"] == "/workspaces/"
    r = await client.get("/jobs/7?status=running", follow_redirects=False)
    assert r.status_code == 301
    assert r.headers["location"] == "/jobs/7/?status=running"
