"""Disk quota on every write, shares charged to their sender, and the races between
start, delete, share and accept, decided in the database: all through the real server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from temporalio.client import WorkflowExecutionStatus

from controllers.base import WorkspaceScan
from db import accounts, quotas
from db.tables import Job, SharedWorkspaceMapping, User, Workspace
from db.workspaces import store_scan
from tests.api.test_workspaces import create, get_one, workspace_dir
from tests.conftest import eventually, make_user_token
from workflows.models import job_workflow_id

KIB = 1024
MIB = 1024 * KIB


async def _person(client: httpx.AsyncClient, api_client_key: str,
                  max_disk_space: int | None = None) -> tuple[dict[str, str], int]:
    token = await make_user_token(client, api_client_key, f"q{secrets.token_hex(5)}")
    found = await accounts.token_user(token)
    assert found is not None
    if max_disk_space is not None:
        await quotas.set_quota(found[0], max_disk_space=max_disk_space)
    return {"UWS-Authorization": f"Token {token}"}, found[0]


async def _quota(client: httpx.AsyncClient, auth: dict[str, str]) -> dict:
    r = await client.get("/users/me/quota/", headers=auth)
    assert r.status_code == 200, r.text
    return r.json()["data"]["quota"]


async def _settled(client: httpx.AsyncClient, auth: dict[str, str], used: int) -> None:
    """Scans done: the usage counts ``used`` bytes and no write holds a claim any more."""
    last: dict = {}

    async def check() -> bool:
        last.update(await _quota(client, auth))
        return last["used_disk_space"] == used and last["reserved_disk_space"] == 0

    try:
        await eventually(check, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"usage never settled at {used}: {last}") from exc


def _snapshot(path: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``path``, dot-files and temporaries included, with its content."""
    out: dict[str, tuple[int, str]] = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), path) + "/"] = (0, "")
        for name in files:
            full = os.path.join(root, name)
            data = Path(full).read_bytes()
            out[os.path.relpath(full, path)] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def _refusal(used: str, limit: str, detail: str) -> str:
    return (f"Disk quota exceeded: your workspaces use {used} of the {limit} allowed; "
            f"{detail}. Free some space first.")


async def _workspace_with_kib(client, auth) -> dict:
    """A workspace holding ``keep.txt`` (1 KiB), once its scan is in."""
    return await create(client, auth, workspace_details={
        "files": [{"name": "keep.txt", "content": "k" * KIB}]})


# --- item 4: the disk quota on uploads, creates and updates ---------------------------------


async def test_upload_over_quota_is_refused_before_anything_is_written(
    client, api_client_key, data_dir: Path
) -> None:
    auth, _ = await _person(client, api_client_key, max_disk_space=MIB)
    ws = await _workspace_with_kib(client, auth)
    await _settled(client, auth, KIB)
    path = workspace_dir(data_dir, ws["id"])
    before = _snapshot(path)
    message = _refusal("1.00 KiB", "1.00 MiB", "this upload needs more than the 1023.00 KiB "
                       "that remain")

    # One file past the quota, under the name of the existing one: the old file stays.
    r = await client.put(f"/workspaces/{ws['id']}/upload/", headers=auth,
                         files=[("f", ("keep.txt", os.urandom(2 * MIB)))])
    assert (r.status_code, r.json()) == (400, {"success": False, "message": message})
    # Several files: the first fits, the second does not; neither lands (all or nothing).
    r = await client.put(f"/workspaces/{ws['id']}/upload/", headers=auth, files=[
        ("a", ("small.txt", b"s" * 100)), ("b", ("big.bin", os.urandom(3 * MIB)))])
    assert (r.status_code, r.json()) == (400, {"success": False, "message": message})
    assert _snapshot(path) == before  # no partial file, no temporary, keep.txt untouched
    assert (await _quota(client, auth))["reserved_disk_space"] == 0  # claims given back

    # What fits is saved and counted at once, before any scan: the next one is refused.
    r = await client.put(f"/workspaces/{ws['id']}/upload/", headers=auth,
                         files=[("f", ("half.bin", b"h" * (512 * KIB)))])
    assert r.status_code == 200, r.text
    r = await client.put(f"/workspaces/{ws['id']}/upload/", headers=auth,
                         files=[("f", ("more.bin", b"m" * (600 * KIB)))])
    assert (r.status_code, r.json()["message"]) == (400, _refusal(
        "513.00 KiB", "1.00 MiB", "this upload needs more than the 511.00 KiB that remain"))
    await _settled(client, auth, KIB + 512 * KIB)  # the scan took over from the claim
    assert set(_snapshot(path)) == set(before) | {"half.bin"}


async def test_create_and_update_over_quota_write_nothing(
    client, api_client_key, data_dir: Path
) -> None:
    auth, _ = await _person(client, api_client_key, max_disk_space=MIB)
    ws = await _workspace_with_kib(client, auth)
    await _settled(client, auth, KIB)
    path = workspace_dir(data_dir, ws["id"])
    user_dir = path.parent
    before, listed = _snapshot(user_dir), await client.get("/workspaces/", headers=auth)
    message = _refusal("1.00 KiB", "1.00 MiB", "these files need 2.00 MiB but only "
                       "1023.00 KiB remain (short by 1.00 MiB)")
    big = [{"name": "keep.txt", "content": "n" * (2 * MIB)}]

    r = await client.post("/workspaces/", headers=auth, json={
        "name": "too-big", "description": "d", "workspace_details": {"files": big}})
    assert (r.status_code, r.json()) == (400, {"success": False, "message": message})
    r = await client.put(f"/workspaces/{ws['id']}/", headers=auth, json={
        "name": "renamed", "workspace_details": {"files": big}})
    assert (r.status_code, r.json()) == (400, {"success": False, "message": message})

    assert _snapshot(user_dir) == before  # no new directory, keep.txt as it was
    after = await client.get("/workspaces/", headers=auth)
    assert after.json() == listed.json()  # no new row, the name unchanged
    assert (await _quota(client, auth))["reserved_disk_space"] == 0
    # Within the quota both still work.
    r = await client.put(f"/workspaces/{ws['id']}/", headers=auth, json={
        "workspace_details": {"files": [{"name": "fits.txt", "content": "f" * (100 * KIB)}]}})
    assert r.status_code == 200, r.text
    assert (path / "fits.txt").stat().st_size == 100 * KIB


async def test_concurrent_uploads_never_jointly_exceed_the_quota(
    client, api_client_key, data_dir: Path
) -> None:
    auth, _ = await _person(client, api_client_key, max_disk_space=MIB)
    ws = await _workspace_with_kib(client, auth)
    await _settled(client, auth, KIB)
    size = 400 * KIB  # two fit in what is left (1023 KiB), three do not

    async def upload(n: int) -> httpx.Response:
        return await client.put(f"/workspaces/{ws['id']}/upload/", headers=auth,
                                files=[("f", (f"part{n}.bin", os.urandom(size)))])

    answers = await asyncio.gather(*(upload(n) for n in range(6)))
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 400}, [r.text for r in answers]
    ok = [n for n, r in enumerate(answers) if r.status_code == 200]
    assert 1 <= len(ok) <= 2, statuses
    for r in answers:
        if r.status_code == 400:
            assert r.json()["message"].startswith("Disk quota exceeded: your workspaces use ")
    on_disk = _snapshot(workspace_dir(data_dir, ws["id"]))
    assert set(on_disk) == {"keep.txt"} | {f"part{n}.bin" for n in ok}
    assert sum(s for s, _ in on_disk.values()) <= MIB
    await _settled(client, auth, KIB + len(ok) * size)


async def test_claims_of_dead_requests_and_older_scans_do_not_count(
    client, api_client_key
) -> None:
    auth, uid = await _person(client, api_client_key, max_disk_space=MIB)
    ws = await _workspace_with_kib(client, auth)
    await _settled(client, auth, KIB)
    # A streaming claim last grown 20 minutes ago: its request died; it holds nothing.
    await Workspace.raw(
        'INSERT INTO uws_disk_reservation ("user", workspace, bytes, refreshed) '
        "VALUES ({}, {}, {}, clock_timestamp() - interval '20 minutes')", uid, ws["id"], MIB)
    assert (await _quota(client, auth))["reserved_disk_space"] == 0
    r = await client.put(f"/workspaces/{ws['id']}/upload/", headers=auth,
                         files=[("f", ("ok.bin", b"o" * (100 * KIB)))])
    assert r.status_code == 200, r.text
    await _settled(client, auth, 101 * KIB)  # its scan also removed the dead claim
    assert not await Workspace.raw(
        "SELECT 1 FROM uws_disk_reservation WHERE workspace = {}", ws["id"])
    # A scan that started before the stored one and ends after it changes nothing.
    older = datetime.now(UTC) - timedelta(minutes=5)
    assert await store_scan(ws["id"], WorkspaceScan(disk_space=1), older)
    assert (await _quota(client, auth))["used_disk_space"] == 101 * KIB


# --- item 5: shares ---------------------------------------------------------------------------


async def test_share_refuses_accounts_that_are_no_person(
    client, api_client_key, engine
) -> None:
    auth, me = await _person(client, api_client_key)
    _, gone = await _person(client, api_client_key)
    await User.update({User.is_active: False}).where(User.id == gone)
    portal = await accounts.token_user(api_client_key)
    assert portal is not None
    ws = await create(client, auth)
    cases = [
        ([me], "A workspace cannot be shared with yourself."),
        ([gone], f"User {gone} is inactive and cannot receive shared workspaces."),
        ([portal[0]], f"User {portal[0]} is an API client account and cannot receive shared "
                      "workspaces."),
    ]
    for ids, message in cases:
        r = await client.post("/shared_workspaces/", headers=auth, json={
            "original_workspace_id": ws["id"], "shared_user_ids": ids})
        assert (r.status_code, r.json()) == (400, {"success": False, "message": message}), ids
    r = await client.post("/shared_workspaces/", headers=auth, json={
        "original_workspace_id": ws["id"], "shared_user_ids": []})
    assert r.json() == {"success": True, "message": "Successful.",
                        "data": {"shared_workspaces": []}}
    assert not await SharedWorkspaceMapping.exists().where(
        SharedWorkspaceMapping.original_workspace == ws["id"])


async def test_pending_shares_are_capped_per_sender(client, api_client_key, controllers) -> None:
    cap = controllers.config.sharing.max_pending_per_user
    assert cap == 20  # the default
    alice, _ = await _person(client, api_client_key)
    _, bob = await _person(client, api_client_key)
    ws = await create(client, alice)

    async def share() -> httpx.Response:
        return await client.post("/shared_workspaces/", headers=alice, json={
            "original_workspace_id": ws["id"], "shared_user_ids": [bob]})

    copies = []
    for _ in range(cap):
        r = await share()
        assert r.status_code == 200, r.text
        copies.append(r.json()["data"]["shared_workspaces"][0]["shared_workspace_id"]["id"])
    r = await share()
    assert (r.status_code, r.json()["message"]) == (400, (
        f"Too many pending shares: {cap} of your shares are not accepted yet and at most "
        f"{cap} may be pending at once, so 1 more cannot be added. Cancel some or wait until "
        "they are accepted."))
    assert await SharedWorkspaceMapping.count().where(
        SharedWorkspaceMapping.original_workspace == ws["id"]) == cap
    # A withdrawn share frees its place at once.
    r = await client.delete(f"/shared_workspaces/{copies[0]}/", headers=alice)
    assert r.status_code == 200, r.text
    r = await share()
    assert r.status_code == 200, r.text


async def test_unaccepted_copies_are_charged_to_the_sender(client, api_client_key) -> None:
    alice, _ = await _person(client, api_client_key, max_disk_space=1536 * KIB)
    bob, bob_id = await _person(client, api_client_key, max_disk_space=100 * KIB)
    original = await create(client, alice, workspace_details={
        "files": [{"name": "data.txt", "content": "d" * (600 * KIB)}]})
    await _settled(client, alice, 600 * KIB)
    bobs = await create(client, bob, default_job_type="local_test_job")

    r = await client.post("/shared_workspaces/", headers=alice, json={
        "original_workspace_id": original["id"], "shared_user_ids": [bob_id]})
    assert r.status_code == 200, r.text
    copy_id = r.json()["data"]["shared_workspaces"][0]["shared_workspace_id"]["id"]
    # A second copy would take alice past her quota: refused, nothing created.
    r = await client.post("/shared_workspaces/", headers=alice, json={
        "original_workspace_id": original["id"], "shared_user_ids": [bob_id]})
    assert (r.status_code, r.json()["message"]) == (400, _refusal(
        "1.17 MiB", "1.50 MiB", "this copy needs 600.00 KiB but only 336.00 KiB remain "
        "(short by 264.00 KiB)"))

    async def copied() -> bool:
        row = await Workspace.select(Workspace.status).where(Workspace.id == copy_id).first()
        return row is not None and row["status"] == "idle"

    await eventually(copied, timeout=60)
    await _settled(client, alice, 1200 * KIB)
    assert (await _quota(client, bob))["used_disk_space"] == 0
    # The unsolicited copy does not block bob's jobs.
    r = await client.put(f"/workspaces/{bobs['id']}/start/", headers=bob, json={})
    assert r.status_code == 200, r.text

    # Accepted, it is bob's (his choice): alice is back to her original alone.
    r = await client.put(f"/shared_workspaces/{copy_id}/accept/", headers=bob)
    assert r.status_code == 200, r.text
    await _settled(client, alice, 600 * KIB)
    await _settled(client, bob, 600 * KIB)
    r = await client.put(f"/workspaces/{bobs['id']}/start/", headers=bob, json={})
    assert (r.status_code, r.json()["message"]) == (400, (
        "Disk quota exceeded: your workspaces use 600.00 KiB of the 100.00 KiB allowed "
        "(over by 500.00 KiB). Free some space to start jobs."))


# --- item 6: races decided in the database ------------------------------------------------


async def _both(first, second, lead: float = 0.05):
    """Send both requests together, ``second`` after a random 0 to ``lead`` seconds (it is
    the quicker to decide: so either may reach the database first); both answers."""
    async def later(call):
        await asyncio.sleep(random.uniform(0, lead))
        return await call

    return await asyncio.gather(first, later(second))


async def test_start_and_delete_together_exactly_one_wins(
    client, api_client_key, temporal_env
) -> None:
    auth, uid = await _person(client, api_client_key)
    started: dict[int, int] = {}  # workspace id -> job id
    deleted: list[int] = []
    for _ in range(50):
        ws = await create(client, auth, default_job_type="local_test_job")
        wid = ws["id"]
        start, remove = await _both(
            client.put(f"/workspaces/{wid}/start/", headers=auth, json={}),
            client.delete(f"/workspaces/{wid}/", headers=auth), lead=0.08)
        outcome = ((start.status_code, start.json()["message"]),
                   (remove.status_code, remove.json()["message"]))
        if start.status_code == 200:
            assert outcome == ((200, "Successful start."), (
                400, "Cannot delete workspace, jobs are running for this workspace.")), outcome
            started[wid] = start.json()["data"]["job"]["id"]
        else:
            assert outcome == ((400, f"Workspace {wid} is deleting and cannot start jobs."),
                               (200, f"Workspace {wid} queued for deletion.")), outcome
            deleted.append(wid)
    print(f"\n50 rounds: start won {len(started)}, delete won {len(deleted)}")

    # No job without its workspace, none for a deleted one.
    rows = await Job.select(Job.id, Job.workspace).where(Job.user == uid)
    assert sorted(r["id"] for r in rows) == sorted(started.values())
    assert {r["workspace"] for r in rows} == set(started)

    seen: dict[int, tuple[str, str]] = {}

    async def all_ended() -> bool:
        jobs = (await client.get("/jobs/", headers=auth)).json()["data"]["jobs"]
        seen.update({j["id"]: (j["status"], j["job_details"]["current_job_details"]
                               .get("message", "")) for j in jobs})
        return all(j["status"] in ("complete", "failed") for j in jobs)

    try:
        await eventually(all_ended, timeout=180, interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"jobs still active: {seen}") from exc
    assert {s for s, _ in seen.values()} == {"complete"}, \
        {j: v for j, v in seen.items() if v[0] != "complete"}
    for job_id in started.values():
        described = await temporal_env.client.get_workflow_handle(
            job_workflow_id(job_id)).describe()
        assert described.status == WorkflowExecutionStatus.COMPLETED, job_id
    running = [w.id async for w in temporal_env.client.list_workflows(
        f'WorkflowType="JobWorkflow" AND ExecutionStatus="Running" AND UwsUserId={uid}')]
    assert running == []

    async def removed() -> bool:
        return not await Workspace.exists().where(Workspace.id.is_in(deleted)) \
            if deleted else True

    await eventually(removed, timeout=60)
    for wid in started:  # the winners' workspaces are intact and idle again
        ws = await get_one(client, auth, wid)
        assert ws is not None and ws["status"] == "idle"


async def test_share_and_delete_together_exactly_one_wins(client, api_client_key) -> None:
    alice, _ = await _person(client, api_client_key)
    _, bob = await _person(client, api_client_key)
    for _ in range(8):
        ws = await create(client, alice)
        wid = ws["id"]
        share, remove = await _both(
            client.post("/shared_workspaces/", headers=alice, json={
                "original_workspace_id": wid, "shared_user_ids": [bob]}),
            client.delete(f"/workspaces/{wid}/", headers=alice))
        if share.status_code == 200:
            assert (remove.status_code, remove.json()["message"]) == (400, (
                f"Workspace {wid} has shared workspaces associated with it, that have not yet "
                "been accepted. Please cancel those shares to delete this workspace."))
            assert len(share.json()["data"]["shared_workspaces"]) == 1
        else:
            assert (share.status_code, share.json()["message"]) == (
                400, f"Workspace {wid} is deleting and cannot be shared.")
            assert remove.status_code == 200, remove.text
            assert not await SharedWorkspaceMapping.exists().where(
                SharedWorkspaceMapping.original_workspace == wid)


async def test_accept_and_withdraw_together_exactly_one_wins(client, api_client_key) -> None:
    alice, _ = await _person(client, api_client_key)
    bob, bob_id = await _person(client, api_client_key)
    ws = await create(client, alice)
    for _ in range(8):
        r = await client.post("/shared_workspaces/", headers=alice, json={
            "original_workspace_id": ws["id"], "shared_user_ids": [bob_id]})
        assert r.status_code == 200, r.text
        copy_id = r.json()["data"]["shared_workspaces"][0]["shared_workspace_id"]["id"]
        accept, withdraw = await _both(
            client.put(f"/shared_workspaces/{copy_id}/accept/", headers=bob),
            client.delete(f"/shared_workspaces/{copy_id}/", headers=alice))
        if accept.status_code == 200:
            assert (withdraw.status_code, withdraw.json()["message"]) == (
                400, f"Shared workspace {copy_id} has been accepted and cannot be deleted.")
            assert await get_one(client, bob, copy_id) is not None
        else:
            assert (accept.status_code, accept.json()["message"]) == (
                404, f"Shared workspace {copy_id} not found.")
            assert withdraw.status_code == 200, withdraw.text

            async def gone(copy_id: int = copy_id) -> bool:
                return not await Workspace.exists().where(Workspace.id == copy_id)

            await eventually(gone, timeout=60)
