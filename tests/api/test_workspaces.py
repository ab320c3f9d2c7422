"""``/workspaces/``: every line of the contract, isolation, path attacks."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from tests.conftest import eventually, make_user_token


async def create(client, auth, **body) -> dict:
    body.setdefault("name", f"ws-{secrets.token_hex(3)}")
    body.setdefault("description", "a test workspace")
    r = await client.post("/workspaces/", headers=auth, json=body)
    assert r.status_code == 200, r.text
    return r.json()["data"]["workspace"]


async def get_one(client, auth, workspace_id: int) -> dict | None:
    r = await client.get(f"/workspaces/{workspace_id}/", headers=auth)
    assert r.status_code == 200
    found = r.json()["data"]["workspaces"]
    return found[0] if found else None


async def scanned(client, auth, workspace_id: int, names: set[str]) -> dict:
    async def check():
        ws = await get_one(client, auth, workspace_id)
        current = ws["workspace_details"]["current_workspace_details"] if ws else {}
        got = {f["name"] for f in current.get("files", [])}
        return ws if names <= got else None

    return await eventually(check)


def workspace_dir(data_dir: Path, ws_id: int) -> Path:
    matches = list((data_dir / "workspaces").glob(f"*/{ws_id}"))
    assert len(matches) == 1, matches
    return matches[0]


async def test_create_with_files_and_symlinks(client, auth, data_dir, tmp_path) -> None:
    source = tmp_path / "dataset"
    source.mkdir()
    # The test config allows no symlink sources (the default): symlinks are off.
    r = await client.post("/workspaces/", headers=auth, json={
        "name": "linked", "description": "d", "workspace_details": {
            "files": [{"name": "a.txt", "content": "hello"}],
            "symlinks": [{"name": "data", "source_path": str(source)}]}})
    assert r.status_code == 400
    assert r.json() == {"success": False, "message": f"Symlink source not allowed: {source}"}
    ws = await create(client, auth, workspace_details={
        "files": [{"name": "a.txt", "content": "hello"}, {"name": "sub/b.py", "content": "x=1"}],
    })
    assert ws["status"] == "idle"
    assert list(ws) == ["id", "name", "description", "disk_space", "datetime_created",
                        "datetime_last_modified", "datetime_last_job_launch",
                        "workspace_details", "status", "default_job_type"]
    path = workspace_dir(data_dir, ws["id"])
    assert (path / "a.txt").read_text() == "hello"
    # A link made from inside (as a job would) is still reported by the scan; an empty
    # upload asks for a scan that surely runs after the link exists.
    (path / "data").symlink_to(source)
    r = await client.put(f"/workspaces/{ws['id']}/upload/", headers=auth,
                         files=[("file", ("empty.txt", b"", "text/plain"))])
    assert r.status_code == 200, r.text
    ws = await scanned(client, auth, ws["id"], {"/a.txt", "/sub/b.py", "/empty.txt"})
    assert ws["workspace_details"]["current_workspace_details"]["symlinks"] == [{"name": "/data"}]
    assert ws["disk_space"] == len("hello") + len("x=1")
    assert ws["workspace_details"]["request_workspace_details"]["files"] == [
        {"name": "a.txt"}, {"name": "sub/b.py"}]


async def test_list_filters_and_empty_message(client, auth) -> None:
    name = f"findme-{secrets.token_hex(3)}"
    ws = await create(client, auth, name=name)
    r = await client.get("/workspaces/", headers=auth, params={"name": name})
    body = r.json()
    assert body["message"] == "Successful."
    assert [w["id"] for w in body["data"]["workspaces"]] == [ws["id"]]
    r = await client.get("/workspaces/", headers=auth, params={"name": "no-such-name"})
    assert r.json() == {"success": True,
                        "message": "Workspace matching given parameters could not be found.",
                        "data": {"workspaces": []}}
    r = await client.get("/workspaces/", headers=auth, params={"status": "idle", "name": name})
    assert len(r.json()["data"]["workspaces"]) == 1


@pytest.mark.parametrize("body", [{}, {"name": "x"}, {"description": "y"}])
async def test_create_missing_fields(client, auth, body) -> None:
    r = await client.post("/workspaces/", headers=auth, json=body)
    assert r.status_code == 400
    assert r.json() == {"success": False, "message": "Missing required fields."}


@pytest.mark.parametrize(("details", "message"), [
    ("nope", "Workspace details not JSON."),
    ({"symlinks": {}}, "'symlinks' index must contain a list."),
    ({"files": "a"}, "'files' index must contain a list."),
    ({"files": [{"name": "../x", "content": ""}]}, "File name cannot contain double dots."),
    ({"symlinks": [{"name": "a/../b", "source_path": "/tmp"}]},
     "Symlink name cannot contain double dots."),
    ({"files": [{"name": "/etc/passwd", "content": ""}]},
     "Invalid file path specified /etc/passwd"),
    ({"symlinks": [{"name": "/abs", "source_path": "/tmp"}]},
     "Invalid symlink destination path specified /abs"),
    ({"files": [{"name": "a\u0000b", "content": ""}]}, "Invalid file path specified a\u0000b"),
    ({"files": [{"name": "x" * 300, "content": ""}]}, "Invalid file path specified " + "x" * 300),
])
async def test_create_rejects_bad_details(client, auth, data_dir, details, message) -> None:
    before = set(os.listdir(data_dir / "workspaces")) if (data_dir / "workspaces").exists() \
        else set()
    r = await client.post("/workspaces/", headers=auth,
                          json={"name": "bad", "description": "d", "workspace_details": details})
    assert r.status_code == 400
    assert r.json() == {"success": False, "message": message}
    after = set(os.listdir(data_dir / "workspaces")) if (data_dir / "workspaces").exists() \
        else set()
    assert after == before


async def test_symlink_source_not_allowed_is_400_and_leaves_nothing(client, auth) -> None:
    # Missing or existing, anywhere outside the allowed roots (none here): one answer.
    name = f"broken-{secrets.token_hex(3)}"
    for source in ("/no/such/path", "/etc/shadow", "/"):
        r = await client.post("/workspaces/", headers=auth, json={
            "name": name, "description": "d",
            "workspace_details": {"symlinks": [{"name": "d", "source_path": source}]},
        })
        assert r.status_code == 400
        assert r.json() == {"success": False, "message": f"Symlink source not allowed: {source}"}
    r = await client.get("/workspaces/", headers=auth, params={"name": name})
    assert r.json()["data"]["workspaces"] == []


async def test_unknown_default_job_type(client, auth) -> None:
    r = await client.post("/workspaces/", headers=auth,
                          json={"name": "n", "description": "d", "default_job_type": "nope"})
    assert r.status_code == 400
    assert r.json()["message"] == "nope is not in the list of available job types."
    ws = await create(client, auth, default_job_type="")
    assert ws["default_job_type"] is None
    ws = await create(client, auth, default_job_type="local_test_job")
    assert ws["default_job_type"] == "local_test_job"


async def test_update(client, auth, data_dir) -> None:
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/", headers=auth, json={
        "name": "renamed", "description": "new",
        "workspace_details": {"files": [{"name": "n.txt", "content": "1"}]},
    })
    assert r.status_code == 200
    assert r.json() == {"success": True, "message": "Update successful."}
    updated = await scanned(client, auth, ws["id"], {"/n.txt"})
    assert (updated["name"], updated["description"]) == ("renamed", "new")
    r = await client.put(f"/workspaces/{ws['id']}/", headers=auth, json={})
    assert r.status_code == 400
    r = await client.put(f"/workspaces/{ws['id']}/", headers=auth,
                         json={"workspace_details": {"files": [{"name": "../e", "content": ""}]}})
    assert r.json()["message"] == "File name cannot contain double dots."
    r = await client.put(f"/workspaces/{ws['id']}/", headers=auth,
                         json={"default_job_type": "nope"})
    assert r.json()["message"] == "nope is not in the list of available job types."


async def test_update_through_planted_symlink_writes_nothing_outside(
    client, auth, data_dir, tmp_path
) -> None:
    ws = await create(client, auth)
    outside = tmp_path / "outside"
    outside.mkdir()
    (workspace_dir(data_dir, ws["id"]) / "evil").symlink_to(outside)
    r = await client.put(f"/workspaces/{ws['id']}/", headers=auth, json={
        "workspace_details": {"files": [{"name": "evil/pwned.txt", "content": "x"}]}})
    assert r.status_code == 400
    assert r.json()["message"] == "Invalid file path specified evil/pwned.txt"
    assert list(outside.iterdir()) == []


async def test_upload(client, auth, data_dir) -> None:
    ws = await create(client, auth)
    files = [("file", ("up.txt", b"uploaded", "text/plain")),
             ("other", ("../../escape.bin", b"\x00\x01", "application/octet-stream"))]
    r = await client.put(f"/workspaces/{ws['id']}/upload/", headers=auth, files=files)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "message": "Successful upload."}
    path = workspace_dir(data_dir, ws["id"])
    assert (path / "up.txt").read_bytes() == b"uploaded"
    assert (path / "escape.bin").read_bytes() == b"\x00\x01"
    await scanned(client, auth, ws["id"], {"/up.txt", "/escape.bin"})


async def test_upload_without_files(client, auth) -> None:
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/upload/", headers=auth, data={"a": "b"},
                         files=[])
    assert r.status_code == 400
    assert r.json()["message"] == "No files found in request."
    r = await client.put(f"/workspaces/{ws['id']}/upload/", headers=auth, json={"a": 1})
    assert r.json()["message"] == "No files found in request."


async def test_upload_over_limit_is_413_and_leaves_nothing(client, auth, data_dir) -> None:
    ws = await create(client, auth)
    big = b"x" * (6 * 1024 * 1024)  # the test settings allow 5 MiB

    async def body():
        boundary = b"BOUNDARY"
        yield (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"f\"; "
               b"filename=\"big.bin\"\r\n\r\n")
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
        yield b"\r\n--" + boundary + b"--\r\n"

    r = await client.put(f"/workspaces/{ws['id']}/upload/", content=body(), headers={
        **auth, "Content-Type": "multipart/form-data; boundary=BOUNDARY"})
    assert r.status_code == 413
    assert r.json()["message"].startswith("Upload exceeds the limit of")
    assert os.listdir(workspace_dir(data_dir, ws["id"])) == []


async def test_invalid_put_type(client, auth) -> None:
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/frobnicate/", headers=auth, json={})
    assert r.status_code == 400
    assert r.json()["message"] == "Invalid PUT type passed."


async def test_isolation_between_users(client, api_client_key, auth) -> None:
    ws = await create(client, auth)
    other = {"UWS-Authorization": f"Token {await make_user_token(client, api_client_key)}"}
    r = await client.get(f"/workspaces/{ws['id']}/", headers=other)
    assert r.json()["data"]["workspaces"] == []
    assert ws["id"] not in [w["id"] for w in
                            (await client.get("/workspaces/", headers=other)).json()["data"]
                            ["workspaces"]]
    for method, suffix, kwargs in [("put", "", {"json": {"name": "x"}}),
                                   ("put", "start/", {"json": {}}),
                                   ("put", "upload/", {"files": [("f", ("a", b"a"))]}),
                                   ("delete", "", {})]:
        r = await client.request(method.upper(), f"/workspaces/{ws['id']}/{suffix}",
                                 headers=other, **kwargs)
        assert r.status_code == 404, (method, suffix)
        assert r.json()["message"] == f"Workspace {ws['id']} not found for user."
    for missing in ("999999999", "99999999999999999999", "abc"):
        r = await client.delete(f"/workspaces/{missing}/", headers=auth)
        assert r.status_code == 404
        assert r.json()["message"] == f"Workspace {missing} not found for user."


async def test_delete_runs_the_workflow(client, auth, data_dir) -> None:
    ws = await create(client, auth, workspace_details={"files": [{"name": "f", "content": "1"}]})
    path = workspace_dir(data_dir, ws["id"])
    r = await client.delete(f"/workspaces/{ws['id']}/", headers=auth)
    assert r.status_code == 200
    assert r.json() == {"success": True, "message": f"Workspace {ws['id']} queued for deletion."}

    async def gone() -> bool:
        return await get_one(client, auth, ws["id"]) is None and not path.exists()

    await eventually(gone)
