"""Hypothesis over the inputs that once answered 500 or were accepted unbounded: JSON
nested past the limit, lone surrogates, NaN/Infinity and oversize strings in every field of
every JSON endpoint; multipart bodies cut at any byte; header sets of any size and count.

Every answer must be a declared 4xx/200 in the envelope, never a 5xx; a refused request
must leave the fuzz user's workspace (API view and disk), workspaces and jobs as they
were; a field over its documented limit must be refused. Seeds are fixed
(``derandomize``); ``UWS_FUZZ_EXAMPLES`` scales the examples (default 25).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path
from typing import Any

import httpx
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import eventually
from tests.fuzz.test_api_fuzz import envelope_problem

EXAMPLES = int(os.environ.get("UWS_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
SLOT = "__hostile_slot__"
NAME_LIMIT, DESCRIPTION_LIMIT, JOB_DETAILS_LIMIT, DEPTH_LIMIT = 256, 65536, 1024**2, 32


# --- hostile JSON values, as JSON text (a deep one cannot go through json.dumps) -------


def _nested(args: tuple[int, str]) -> tuple[str, str]:
    depth, opener = args
    closer = "]" if opener == "[" else "}"
    inner = "" if opener == "[" else "0"
    return "deep", opener * depth + inner + closer * depth


def _with_surrogate(parts: tuple[str, str, str]) -> tuple[str, str]:
    return "surrogate", json.dumps("".join(parts))  # ensure_ascii: \udXXX as a client sends


hostile_values = st.one_of(
    st.tuples(st.integers(DEPTH_LIMIT, 20_000), st.sampled_from(["[", '{"k":'])).map(_nested),
    st.tuples(st.text(max_size=4), st.characters(categories=["Cs"]),
              st.text(max_size=4)).map(_with_surrogate),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]).map(
        lambda text: ("constant", text)),
    st.sampled_from([NAME_LIMIT, DESCRIPTION_LIMIT, JOB_DETAILS_LIMIT]).flatmap(
        lambda n: st.integers(n - 2, n + 64)).map(lambda n: ("long", json.dumps("x" * n))),
)


def _put(body: Any, path: tuple[str | int, ...]) -> Any:
    """A copy of ``body`` with the value at ``path`` replaced by the slot marker."""
    if not path:
        return SLOT
    body = json.loads(json.dumps(body))
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = SLOT
    return body


def endpoints(wid: int, client_key: str) -> list[tuple[str, str, Any, list[tuple[Any, ...]]]]:
    """(method, path, a valid body, the places a hostile value goes)."""
    details = {"files": [{"name": "f.txt", "content": "c"}], "symlinks": []}
    workspace_slots = [("name",), ("description",), ("default_job_type",),
                       ("workspace_details",), ("workspace_details", "files"),
                       ("workspace_details", "files", 0, "name"),
                       ("workspace_details", "files", 0, "content"),
                       ("workspace_details", "x"), ("x",)]
    return [
        ("POST", "/workspaces/", {"name": "fuzzed", "description": "d",
                                  "workspace_details": details}, workspace_slots),
        ("PUT", f"/workspaces/{wid}/", {"name": "target", "description": "d",
                                        "workspace_details": details}, workspace_slots),
        ("PUT", f"/workspaces/{wid}/start/",
         {"job_type": "local_test_job", "job_details": {"a": 1}, "resource_options": {}},
         [("job_type",), ("job_details",), ("job_details", "a"), ("resource_options",),
          ("resource_options", "num_cpus")]),
        ("POST", "/shared_workspaces/", {"original_workspace_id": wid, "shared_user_ids": []},
         [("original_workspace_id",), ("shared_user_ids",), ("x",)]),
        ("POST", "/tokens/", {"client_token": client_key, "user_info": {
            "username": f"fuzz{secrets.token_hex(3)}", "email": "fuzz@example.org"}},
         [("client_token",), ("user_info",), ("user_info", "username"),
          ("user_info", "first_name")]),
    ]


def must_refuse(path: str, slot: tuple[Any, ...], kind: str, text: str) -> bool:
    """Whether the contract and the documented limits say 400 for this input."""
    if kind != "long":
        return True  # never valid JSON for us, in any field
    length = len(text) - 2
    if path.startswith("/workspaces/") and slot == ("name",):
        return length > NAME_LIMIT
    if path.startswith("/workspaces/") and slot == ("description",):
        return length > DESCRIPTION_LIMIT
    if path.endswith("/start/") and slot[:1] == ("job_details",):
        return length > JOB_DETAILS_LIMIT
    return False


# --- what a refused request must leave alone --------------------------------------------


def state(base: str, auth: dict[str, str], wid: int, path: Path) -> tuple[Any, ...]:
    """What a request could write: the target's fields and files, which workspaces and
    jobs exist. Not what earlier accepted requests change later on their own (scans, job
    statuses, a job's ``.jobs/`` files)."""
    def get(url: str) -> Any:
        return requests.get(base + url, headers=auth, timeout=60).json()["data"]

    ws = get(f"/workspaces/{wid}/")["workspaces"][0]
    fields = ({k: ws[k] for k in ("name", "description", "default_job_type")},
              ws["workspace_details"]["request_workspace_details"])
    files = {str(p.relative_to(path)): p.read_bytes() if p.is_file() else "dir"
             for p in sorted(path.rglob("*")) if p.relative_to(path).parts[0] != ".jobs"}
    return (fields, files, [w["id"] for w in get("/workspaces/")["workspaces"]],
            [j["id"] for j in get("/jobs/")["jobs"]])


async def _target(client: httpx.AsyncClient, auth: dict[str, str], data_dir: Path,
                  ) -> tuple[int, Path]:
    r = await client.post("/workspaces/", headers=auth, json={
        "name": "target", "description": "d", "default_job_type": "local_test_job",
        "workspace_details": {"files": [{"name": "a.txt", "content": "original"}]}})
    wid = r.json()["data"]["workspace"]["id"]

    async def scanned() -> bool:
        got = (await client.get(f"/workspaces/{wid}/", headers=auth)).json()
        current = got["data"]["workspaces"][0]["workspace_details"]["current_workspace_details"]
        return current["files"] == [{"name": "/a.txt"}]

    await eventually(scanned)
    (path,) = (data_dir / "workspaces").glob(f"*/{wid}")
    return wid, path


async def _jobs_end(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    async def ended() -> bool:
        jobs = (await client.get("/jobs/", headers=auth)).json()["data"]["jobs"]
        return all(j["status"] in ("complete", "failed") for j in jobs)

    await eventually(ended, timeout=120, interval=0.5)


async def test_hostile_json_in_any_field(client: httpx.AsyncClient, server_url: str,
                                         auth: dict[str, str], api_client_key: str,
                                         data_dir: Path) -> None:
    wid, path = await _target(client, auth, data_dir)
    targets = endpoints(wid, api_client_key)
    cases = st.sampled_from(targets).flatmap(
        lambda t: st.tuples(st.just(t), st.sampled_from(t[3]), hostile_values))
    failures: list[str] = []
    seen: dict[int, int] = {}
    kinds: dict[str, int] = {}

    @FUZZ
    @given(case=cases)
    def send(case: Any) -> None:
        (method, url, valid, _), slot, (kind, text) = case
        body = json.dumps(_put(valid, slot)).replace(json.dumps(SLOT), text)
        before = state(server_url, auth, wid, path)
        r = requests.request(method, server_url + url, data=body.encode(), timeout=60,
                             headers={**auth, "Content-Type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        kinds[kind] = kinds.get(kind, 0) + 1
        label = f"{method} {url} {slot} {kind} {text[:60]!r}"
        if problem := envelope_problem(method, r):
            failures.append(f"{label}: {problem}")
        elif must_refuse(url, slot, kind, text) and r.status_code != 400:
            failures.append(f"{label}: {r.status_code} {r.text[:200]}, not 400")
        elif r.status_code >= 400 and state(server_url, auth, wid, path) != before:
            failures.append(f"{label}: {r.status_code} but something was written")

    await asyncio.to_thread(send)
    print(f"\nhostile JSON: statuses {dict(sorted(seen.items()))}, values {kinds}")
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} failures)"
    if EXAMPLES >= 20:  # every kind of hostile value was tried
        assert set(kinds) == {"deep", "surrogate", "constant", "long"}, kinds
    await _jobs_end(client, auth)


async def test_fields_around_their_limits(client: httpx.AsyncClient, server_url: str,
                                         auth: dict[str, str], data_dir: Path) -> None:
    wid, path = await _target(client, auth, data_dir)
    fields = [  # (method, path, body for a value of n characters, limit, message)
        ("POST", "/workspaces/", lambda n: {"name": "x" * n, "description": "d"},
         NAME_LIMIT, f"'name' must be at most {NAME_LIMIT} characters."),
        ("PUT", f"/workspaces/{wid}/", lambda n: {"name": "x" * n},
         NAME_LIMIT, f"'name' must be at most {NAME_LIMIT} characters."),
        ("POST", "/workspaces/", lambda n: {"name": "n", "description": "x" * n},
         DESCRIPTION_LIMIT, f"'description' must be at most {DESCRIPTION_LIMIT} characters."),
        ("PUT", f"/workspaces/{wid}/", lambda n: {"description": "x" * n},
         DESCRIPTION_LIMIT, f"'description' must be at most {DESCRIPTION_LIMIT} characters."),
        # {"s":"..."} is 8 bytes of JSON around the string.
        ("PUT", f"/workspaces/{wid}/start/", lambda n: {"job_details": {"s": "x" * (n - 8)}},
         JOB_DETAILS_LIMIT, f"'job_details' must be at most {JOB_DETAILS_LIMIT} bytes as JSON."),
    ]
    failures: list[str] = []

    @FUZZ
    @given(field=st.sampled_from(fields), offset=st.integers(-3, 3) | st.integers(4, 10**6))
    def send(field: Any, offset: int) -> None:
        method, url, body, limit, message = field
        before = state(server_url, auth, wid, path)
        r = requests.request(method, server_url + url, json=body(limit + offset),
                             headers=auth, timeout=60)
        label = f"{method} {url} at limit{offset:+d}"
        if offset > 0:
            if (r.status_code, r.json()) != (400, {"success": False, "message": message}):
                failures.append(f"{label}: {r.status_code} {r.text[:200]}")
            elif state(server_url, auth, wid, path) != before:
                failures.append(f"{label}: refused, but something was written")
        elif r.status_code != 200:
            failures.append(f"{label}: {r.status_code} {r.text[:200]}")

    await asyncio.to_thread(send)
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} failures)"
    await _jobs_end(client, auth)


async def test_an_upload_cut_anywhere(client: httpx.AsyncClient, server_url: str,
                                      auth: dict[str, str], data_dir: Path) -> None:
    wid, path = await _target(client, auth, data_dir)
    boundary = secrets.token_hex(12)
    failures: list[str] = []

    @FUZZ
    @given(content=st.binary(max_size=3000), where=st.floats(0, 1))
    def upload(content: bytes, where: float) -> None:
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; "
                f"filename=\"a.txt\"\r\n\r\n").encode()
        body = head + content + f"\r\n--{boundary}--\r\n".encode()
        complete_at = len(body) - 2  # the closing CRLF is optional
        # Half the cuts land in the last bytes, where the closing boundary is.
        cut = int(where * len(body)) if where < 0.5 else len(body) - int((where - 0.5) * 60)
        before = (path / "a.txt").read_bytes(), sorted(p.name for p in path.iterdir())
        r = requests.put(f"{server_url}/workspaces/{wid}/upload/", data=body[:cut], timeout=60,
                         headers={**auth, "Content-Type": f"multipart/form-data; "
                                                         f"boundary={boundary}"})
        label = f"cut {cut}/{len(body)}"
        if problem := envelope_problem("PUT", r):
            failures.append(f"{label}: {problem}")
        elif cut >= complete_at:
            if r.status_code != 200 or (path / "a.txt").read_bytes() != content:
                failures.append(f"{label}: a whole body gave {r.status_code} {r.text[:200]}")
        elif r.status_code != 400:
            failures.append(f"{label}: a cut body gave {r.status_code} {r.text[:200]}")
        elif ((path / "a.txt").read_bytes(), sorted(p.name for p in path.iterdir())) != before:
            failures.append(f"{label}: a cut body changed the workspace")

    await asyncio.to_thread(upload)
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} failures)"


async def test_any_header_set(server_url: str) -> None:
    failures: list[str] = []
    too_large = {"Request headers are too large.", "Too many request headers."}

    @FUZZ
    @given(count=st.integers(0, 400), each=st.integers(0, 2000), big=st.integers(0, 150_000))
    def get(count: int, each: int, big: int) -> None:
        headers = {f"X-F{i}": "v" * each for i in range(count)} | {"X-Big": "b" * big}
        size = sum(len(k) + len(v) + 4 for k, v in headers.items())
        r = requests.get(f"{server_url}/job_types/", headers=headers, timeout=60)
        label = f"{count} headers of {each} bytes + {big}"
        if problem := envelope_problem("GET", r):
            failures.append(f"{label}: {problem}")
        elif count + 6 > 100 or size > 64 * 1024:  # requests adds 5 of its own
            if r.status_code != 431 or r.json()["message"] not in too_large:
                failures.append(f"{label}: {r.status_code}, not 431")
        elif count + 6 < 95 and size < 60 * 1024 and r.status_code != 200:
            failures.append(f"{label}: {r.status_code} {r.text[:200]}")

    await asyncio.to_thread(get)
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} failures)"
