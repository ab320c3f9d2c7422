"""Sharing end to end over HTTP between real users: copy, e-mail, accept, listing rules,
decline, permissions."""

from __future__ import annotations

import email
import email.policy
import os
import secrets
from pathlib import Path

from db.tables import Workspace
from tests.api.test_workspaces import create, get_one, workspace_dir
from tests.conftest import dataset_dir, eventually, make_user_token


async def _user(client, api_client_key: str, name: str) -> tuple[dict[str, str], int, str]:
    username = f"{name}{secrets.token_hex(3)}"
    token = await make_user_token(client, api_client_key, username)
    auth = {"UWS-Authorization": f"Token {token}"}
    # Found by someone else, as a sharer would find them.
    finder = await make_user_token(client, api_client_key)
    r = await client.get("/users/", headers={"UWS-Authorization": f"Token {finder}"},
                         params={"search": username})
    return auth, r.json()["data"]["users"][0]["id"], f"{username}@example.org"


async def _copy_status(copy_id: int) -> str | None:
    row = await Workspace.select(Workspace.status).where(Workspace.id == copy_id).first()
    return row["status"] if row else None


async def test_share_flow_between_two_users(
    client, api_client_key, data_dir: Path, mailbox, tmp_path
) -> None:
    alice, _, _ = await _user(client, api_client_key, "alice")
    bob, bob_id, bob_email = await _user(client, api_client_key, "bob")
    dataset = dataset_dir()
    original = await create(client, alice, default_job_type="local_test_job",
                            workspace_details={
        "files": [{"name": "a.txt", "content": "alpha"},
                  {"name": "sub/b.txt", "content": "beta"},
                  {"name": ".secret", "content": "not shared"}],
        "symlinks": [{"name": "data", "source_path": str(dataset)}]})
    r = await client.put(f"/workspaces/{original['id']}/start/", headers=alice, json={
        "resource_options": {"num_cpus": 2}})
    assert r.status_code == 200

    r = await client.post("/shared_workspaces/", headers=alice, json={
        "original_workspace_id": original["id"], "shared_user_ids": [bob_id]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"] == "Successful."
    share = body["data"]["shared_workspaces"][0]
    assert set(share) == {"original_workspace_id", "shared_workspace_id",
                          "last_resource_options", "last_job_type", "is_accepted",
                          "datetime_share_created"}
    assert share["is_accepted"] is False
    assert share["last_job_type"] == "local_test_job"
    assert share["last_resource_options"]["num_cpus"] == 2
    assert share["original_workspace_id"]["id"] == original["id"]
    assert share["shared_workspace_id"]["user_id"]["email"] == bob_email
    copy_id = share["shared_workspace_id"]["id"]

    # Before acceptance: not listed, and the recipient can do nothing with it.
    assert await get_one(client, bob, copy_id) is None
    pending = f"Workspace {copy_id} is a shared workspace and has not been accepted."
    for method, suffix in (("PUT", ""), ("PUT", "start/"), ("DELETE", "")):
        r = await client.request(method, f"/workspaces/{copy_id}/{suffix}", headers=bob,
                                 json={"name": "x"} if method == "PUT" else None)
        assert (r.status_code, r.json()["message"]) == (400, pending), (method, suffix)
    r = await client.delete(f"/workspaces/{original['id']}/", headers=alice)
    assert r.status_code == 400
    assert r.json()["message"].startswith(
        f"Workspace {original['id']} has shared workspaces associated with it")

    assert await eventually(lambda: _copy_status_is(copy_id, "idle"), timeout=60)
    mails = await eventually(lambda: _mails(mailbox, bob_email), timeout=30)
    message = email.message_from_bytes(mails[0], policy=email.policy.default)
    assert original["name"] in message["Subject"]
    text = message.get_content()
    assert original["name"] in text and f"/shared_workspaces/{copy_id}/accept/" in text

    r = await client.get("/shared_workspaces/", headers=alice)
    assert [s["shared_workspace_id"]["id"] for s in r.json()["data"]["original_workspaces"]] \
        == [copy_id]
    r = await client.get("/shared_workspaces/", headers=bob, params={"is_accepted": "false"})
    assert [s["shared_workspace_id"]["id"] for s in r.json()["data"]["shared_workspaces"]] \
        == [copy_id]
    r = await client.get("/shared_workspaces/", headers=bob, params={"is_accepted": "true"})
    assert r.json()["message"] == "Shared workspace matching given parameters could not be found."

    r = await client.put(f"/shared_workspaces/{copy_id}/accept/", headers=bob)
    assert r.json() == {"success": True, "message": "Successful."}
    listed = await get_one(client, bob, copy_id)
    assert listed is not None and listed["status"] == "idle"
    names = {f["name"] for f in listed["workspace_details"]["current_workspace_details"]["files"]}
    assert names == {"/a.txt", "/sub/b.txt"}
    copy_dir = workspace_dir(data_dir, copy_id)
    assert (copy_dir / "sub" / "b.txt").read_text() == "beta"
    assert not (copy_dir / ".secret").exists()
    assert os.readlink(copy_dir / "data") == str(dataset)
    r = await client.delete(f"/shared_workspaces/{copy_id}/", headers=bob)
    assert r.status_code == 400
    assert r.json()["message"] == (f"Shared workspace {copy_id} has been accepted and cannot be "
                                   "deleted.")
    r = await client.get(f"/shared_workspaces/{copy_id}/", headers=bob)
    assert r.json()["data"]["shared_workspaces"][0]["is_accepted"] is True


async def _copy_status_is(copy_id: int, status: str) -> bool:
    return await _copy_status(copy_id) == status


async def _mails(mailbox, address: str) -> list[bytes]:
    return mailbox.to(address)


async def test_decline_removes_the_copy(client, api_client_key, data_dir: Path) -> None:
    alice, _, _ = await _user(client, api_client_key, "alice")
    bob, bob_id, _ = await _user(client, api_client_key, "bob")
    carol, _, _ = await _user(client, api_client_key, "carol")
    original = await create(client, alice, workspace_details={
        "files": [{"name": "f.txt", "content": "x"}]})
    r = await client.post("/shared_workspaces/", headers=alice, json={
        "original_workspace_id": original["id"], "shared_user_ids": [bob_id]})
    entry = r.json()["data"]["shared_workspaces"][0]
    assert entry["last_job_type"] == ""  # no job yet: the reference's "", never null
    copy_id = entry["shared_workspace_id"]["id"]
    await eventually(lambda: _copy_status_is(copy_id, "idle"), timeout=60)
    copy_dir = workspace_dir(data_dir, copy_id)
    r = await client.delete(f"/shared_workspaces/{copy_id}/", headers=carol)
    assert r.status_code == 403
    assert r.json()["message"] == f"User does not have permissions for shared workspace {copy_id}."
    r = await client.put(f"/shared_workspaces/{copy_id}/accept/", headers=alice)
    assert (r.status_code, r.json()["message"]) == (404, f"Shared workspace {copy_id} not found.")
    r = await client.put(f"/shared_workspaces/{copy_id}/reject/", headers=bob)
    assert r.json()["message"] == "Invalid PUT type passed."
    r = await client.delete(f"/shared_workspaces/{copy_id}/", headers=bob)
    assert r.json() == {"success": True,
                        "message": f"Shared workspace {copy_id} queued for deletion."}

    async def gone() -> bool:
        return await _copy_status(copy_id) is None and not copy_dir.exists()

    await eventually(gone, timeout=60)
    r = await client.delete(f"/workspaces/{original['id']}/", headers=alice)
    assert r.status_code == 200  # no pending share any more


async def test_create_share_validation(client, api_client_key) -> None:
    alice, _, _ = await _user(client, api_client_key, "alice")
    bob, bob_id, _ = await _user(client, api_client_key, "bob")
    mine = await create(client, alice)
    theirs = await create(client, bob)
    cases = [
        ({"original_workspace_id": mine["id"]}, 400, "Missing required fields."),
        ({"shared_user_ids": [bob_id]}, 400, "Missing required fields."),
        ({"original_workspace_id": theirs["id"], "shared_user_ids": [bob_id]}, 404,
         f"Workspace {theirs['id']} not found for user."),
        ({"original_workspace_id": 999999999, "shared_user_ids": [bob_id]}, 404,
         "Workspace 999999999 not found for user."),
        ({"original_workspace_id": mine["id"], "shared_user_ids": bob_id}, 400,
         "shared_user_ids is not a list."),
        ({"original_workspace_id": mine["id"], "shared_user_ids": [999999999]}, 400,
         "Invalid user id provided."),
        ({"original_workspace_id": mine["id"], "shared_user_ids": ["x"]}, 400,
         "Invalid user id provided."),
    ]
    for body, code, message in cases:
        r = await client.post("/shared_workspaces/", headers=alice, json=body)
        assert (r.status_code, r.json()["message"]) == (code, message), body
    r = await client.get("/shared_workspaces/999999999/", headers=alice)
    assert r.json()["message"] == "Shared workspace matching given parameters could not be found."
    r = await client.delete("/shared_workspaces/999999999/", headers=alice)
    assert (r.status_code, r.json()["message"]) == (404, "Shared workspace 999999999 not found.")
