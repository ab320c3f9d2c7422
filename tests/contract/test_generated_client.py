"""A client generated from the served description drives the whole tour against the real
server, through the generated functions and models only: sign-in, a workspace with files,
an upload, a job run to completion, a job stopped, a share accepted, deletions."""

from __future__ import annotations

import io
import secrets
from types import ModuleType
from typing import Any

import httpx

from tests.conftest import eventually

TIMEOUT = httpx.Timeout(60)


def _ops(gen: ModuleType, tag: str, name: str) -> Any:
    """The generated module of one operation (``api/<tag>/<operation>.py``)."""
    import importlib

    return importlib.import_module(f"{gen.__name__}.api.{tag}.{name}")


async def _sign_in(gen: ModuleType, base_url: str, client_key: str, username: str) -> str:
    m = gen.models
    async with gen.Client(base_url=base_url, timeout=TIMEOUT,
                          raise_on_unexpected_status=True) as anonymous:
        answer = await _ops(gen, "tokens", "create_user_token").asyncio(
            client=anonymous, body=m.TokenRequest(
                client_token=client_key,
                user_info=m.UserInfo(username=username, email=f"{username}@example.org",
                                     first_name=username.title(), last_name="Tour")))
    assert isinstance(answer, m.TokenResponse), answer
    assert answer.message == "Successful authentication."
    return answer.token


def _authenticated(gen: ModuleType, base_url: str, token: str) -> Any:
    return gen.AuthenticatedClient(base_url=base_url, token=token, prefix="Token",
                                   auth_header_name="UWS-Authorization", timeout=TIMEOUT,
                                   raise_on_unexpected_status=True)


async def test_the_tour_through_a_generated_client(
    generated: ModuleType, server_url: str, api_client_key: str
) -> None:
    gen, m = generated, generated.models
    workspaces = "workspaces"
    tag = secrets.token_hex(4)
    alice_token = await _sign_in(gen, server_url, api_client_key, f"alice{tag}")
    bob_token = await _sign_in(gen, server_url, api_client_key, f"bob{tag}")
    # The same user always gets the same key.
    assert await _sign_in(gen, server_url, api_client_key, f"alice{tag}") == alice_token

    async with _authenticated(gen, server_url, alice_token) as alice, \
            _authenticated(gen, server_url, bob_token) as bob:
        # A workspace with a file, then an upload into it.
        created = await _ops(gen, workspaces, "create_workspace").asyncio(
            client=alice, body=m.WorkspaceCreate(
                name="tour", description="generated client", default_job_type="local_test_job",
                workspace_details=m.WorkspaceDetailsRequest(
                    files=[m.WorkspaceFile(name="notes.txt", content="hello")])))
        assert isinstance(created, m.WorkspaceCreatedResponse), created
        workspace = created.data.workspace
        wid = str(workspace.id)
        assert workspace.status == m.WorkspaceStatus.IDLE

        uploaded = await _ops(gen, workspaces, "upload_to_workspace").asyncio(
            wid, client=alice, body=m.UploadToWorkspaceBody(files=[
                gen.types.File(payload=io.BytesIO(b"1,2,3\n"), file_name="data.csv")]))
        assert isinstance(uploaded, m.MessageResponse), uploaded
        assert uploaded.message == "Successful upload."

        async def both_files_on_disk() -> bool:
            listing = await _ops(gen, workspaces, "get_workspace").asyncio(wid, client=alice)
            assert isinstance(listing, m.WorkspaceListResponse), listing
            (one,) = listing.data.workspaces
            current = one.workspace_details.current_workspace_details
            return {f.name for f in current.files} >= {"/notes.txt", "/data.csv"}

        await eventually(both_files_on_disk, timeout=60)

        # A job, read until complete.
        started = await _ops(gen, workspaces, "start_workspace_job").asyncio(
            wid, client=alice, body=m.JobStart(
                job_type="local_test_job", resource_options=m.ResourceOptions(num_cpus=1)))
        assert isinstance(started, m.JobStartedResponse), started
        assert started.message == "Successful start."
        job_id = str(started.data.job.id)

        async def status_of(jid: str) -> Any:
            listing = await _ops(gen, "jobs", "get_job").asyncio(jid, client=alice)
            assert isinstance(listing, m.JobListResponse), listing
            (job,) = listing.data.jobs
            return job.status

        async def complete(jid: str) -> bool:
            return await status_of(jid) == m.JobStatus.COMPLETE

        await eventually(lambda: complete(job_id), timeout=90, interval=0.3)

        # Another, stopped while it runs.
        started = await _ops(gen, workspaces, "start_workspace_job").asyncio(
            wid, client=alice, body=m.JobStart(
                job_details=m.JobStartJobDetails.from_dict({"duration_seconds": 120})))
        assert isinstance(started, m.JobStartedResponse), started
        long_job = str(started.data.job.id)

        async def running() -> bool:
            return await status_of(long_job) == m.JobStatus.RUNNING

        await eventually(running, timeout=90, interval=0.3)
        stopped = await _ops(gen, "jobs", "stop_job").asyncio(long_job, client=alice)
        assert isinstance(stopped, m.MessageResponse), stopped
        assert stopped.message == "Job queued to stop."
        again = await _ops(gen, "jobs", "stop_job").asyncio(long_job, client=alice)
        assert isinstance(again, m.ErrorResponse)  # the envelope, parsed as declared
        assert (again.success, again.message) == (False, "This job is not running or pending.")
        await eventually(lambda: complete(long_job), timeout=90, interval=0.3)

        # A share with Bob, who finds it and accepts it.
        found = await _ops(gen, "users", "search_users").asyncio(
            client=alice, search=f"bob{tag}")
        assert isinstance(found, m.UsersResponse), found
        (bob_user,) = found.data.users
        shared = await _ops(gen, "shared_workspaces", "share_workspace").asyncio(
            client=alice, body=m.ShareCreate(original_workspace_id=int(wid),
                                             shared_user_ids=[bob_user.id]))
        assert isinstance(shared, m.SharesCreatedResponse), shared
        (share,) = shared.data.shared_workspaces
        assert share.last_job_type == "local_test_job" and share.is_accepted is False
        copy_id = str(share.shared_workspace_id.id)

        received = await _ops(gen, "shared_workspaces", "list_shared_workspaces").asyncio(
            client=bob)
        assert isinstance(received, m.ShareListResponse), received
        assert [s.shared_workspace_id.id for s in received.data.shared_workspaces] == \
            [int(copy_id)]
        accepted = await _ops(gen, "shared_workspaces", "accept_shared_workspace").asyncio(
            copy_id, client=bob)
        assert isinstance(accepted, m.MessageResponse), accepted
        assert accepted.message == "Successful."

        async def copy_ready() -> bool:
            listing = await _ops(gen, workspaces, "list_workspaces").asyncio(client=bob)
            assert isinstance(listing, m.WorkspaceListResponse), listing
            mine = [w for w in listing.data.workspaces if w.id == int(copy_id)]
            return bool(mine) and mine[0].status == m.WorkspaceStatus.IDLE

        await eventually(copy_ready, timeout=90, interval=0.3)

        # Deletions: Bob's copy, Alice's original; both go away.
        for owner, target in ((bob, copy_id), (alice, wid)):
            deleted = await _ops(gen, workspaces, "delete_workspace").asyncio(
                target, client=owner)
            assert isinstance(deleted, m.MessageResponse), deleted
            assert deleted.message == f"Workspace {target} queued for deletion."

            async def gone(owner: Any = owner, target: str = target) -> bool:
                listing = await _ops(gen, workspaces, "get_workspace").asyncio(
                    target, client=owner)
                assert isinstance(listing, m.WorkspaceListResponse), listing
                return listing.data.workspaces == []

            await eventually(gone, timeout=90, interval=0.3)

        # Someone else's id answers the envelope's 404, parsed as declared.
        missing = await _ops(gen, workspaces, "delete_workspace").asyncio(wid, client=bob)
        assert isinstance(missing, m.ErrorResponse)
        assert missing.message == f"Workspace {wid} not found for user."
