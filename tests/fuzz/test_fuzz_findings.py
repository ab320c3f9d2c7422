"""What the fuzzer found, pinned: each input once answered 500 or broke the schema."""

from __future__ import annotations

import httpx

from tests.conftest import eventually


async def test_nul_in_a_filter_is_a_client_error(client: httpx.AsyncClient, auth: dict) -> None:
    for path in ("/users/?search=a%00b", "/workspaces/?name=a%00b", "/jobs/?status=%00"):
        r = await client.get(path, headers=auth)
        assert r.status_code == 400, (path, r.text)
        assert r.json() == {"success": False,
                            "message": "Text may not contain NUL characters."}


async def test_nul_in_a_workspace_name_is_a_client_error(
    client: httpx.AsyncClient, auth: dict
) -> None:
    r = await client.post("/workspaces/", headers=auth,
                          json={"name": "a\u0000b", "description": "d"})
    assert r.status_code == 400, r.text
    assert r.json()["success"] is False


async def test_a_job_type_that_is_not_a_string(client: httpx.AsyncClient, auth: dict) -> None:
    r = await client.post("/workspaces/", headers=auth, json={
        "name": "n", "description": "d", "default_job_type": ["local_test_job"]})
    assert r.status_code == 400, r.text
    assert r.json()["message"] == \
        "['local_test_job'] is not in the list of available job types."


async def test_upload_keeps_a_utf8_filename(client: httpx.AsyncClient, auth: dict) -> None:
    r = await client.post("/workspaces/", headers=auth, json={"name": "u", "description": "d"})
    wid = r.json()["data"]["workspace"]["id"]
    name = "données-日本-\U000da8d6.txt"  # beyond latin-1, and beyond the BMP
    r = await client.put(f"/workspaces/{wid}/upload/", headers=auth,
                         files={"file": (name, b"content")})
    assert r.status_code == 200, r.text

    async def listed() -> bool:
        got = await client.get(f"/workspaces/{wid}/", headers=auth)
        details = got.json()["data"]["workspaces"][0]["workspace_details"]
        return f"/{name}" in [f["name"] for f in details["current_workspace_details"]["files"]]

    assert await eventually(listed, timeout=30)


async def test_listings_are_described_as_json_objects(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    for path in ("/workspaces/", "/workspaces/{workspace_id}/", "/jobs/", "/jobs/{job_id}/"):
        # Finished bytes, still described as the listing's model, not as a string.
        ok = schema["paths"][path]["get"]["responses"]["200"]
        ref = ok["content"]["application/json"]["schema"]["$ref"]
        model = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert model["type"] == "object" and "data" in model["properties"], path
