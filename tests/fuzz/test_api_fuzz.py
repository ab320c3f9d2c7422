"""Schemathesis over every operation of the OpenAPI description the app serves, as served
(nothing patched in), against the real stack (the session's uvicorn, PostgreSQL, Temporal
and worker).

Each operation gets generated requests (valid and invalid by the schema), with the fuzz
user's token, without one, with an unknown one and with a malformed header, on generated
ids and on the fuzz user's real workspaces, jobs and shares. Every answer must be declared
(status and body), carry the contract's envelope, and never be a 5xx other than the two
the contract names. Seeds are fixed (``derandomize``); ``UWS_FUZZ_EXAMPLES`` sets the
examples per operation (default 25).

The requests are synchronous (``requests``), so they run in a thread while this test's
event loop keeps serving the app.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import eventually, make_user_token

EXAMPLES = int(os.environ.get("UWS_FUZZ_EXAMPLES", "25"))
# 500s the contract itself prescribes (a missing symlink source, a broken workspace dir).
ALLOWED_500 = ("Symlink path not found: ", "Workspace directory is missing or invalid.")
AUTH_401 = {"Authentication credentials were not provided.", "Invalid auth header format.",
            "Invalid token provided.", "Incorrect authentication credentials."}
# A JupyterLab would outlive the test (the short test job does not): such starts are left
# out of what is sent, the description itself stays as served.
LONG_JOB_TYPES = ("jupyter_lab",)
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass
class Tally:
    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    by_operation: dict[str, dict[int, int]] = field(default_factory=dict)
    messages: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[str] = field(default_factory=list)


def envelope_problem(method: str, response: Any) -> str | None:
    """What is wrong with an answer by the contract's envelope rules, or ``None``."""
    status = response.status_code
    if status >= 500 and not (status == 500 and any(
            m in response.text for m in ALLOWED_500)):
        return f"server error {status}: {response.text[:300]}"
    if not response.content:
        return None if status in (204, 301) else f"{status} without a body"
    try:
        body = response.json()
    except ValueError:
        return f"{status}: body is not JSON: {response.text[:200]!r}"
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool) \
            or not isinstance(body.get("message"), str):
        return f"{status}: no success/message envelope: {response.text[:200]}"
    if body["success"] != (status < 400):
        return f"{status} with success={body['success']}"
    if status == 401 and body["message"] not in AUTH_401:
        return f"401 with an unknown message: {body['message']!r}"
    if status == 405 and body["message"] != f'Method "{method}" not allowed.':
        return f"405 with message {body['message']!r}"
    return None


def auth_headers(token: str) -> st.SearchStrategy[tuple[str, dict[str, str]]]:
    """(what it is, the headers): mostly the fuzz user, sometimes no or a bad header."""
    good = ("token", {"UWS-Authorization": f"Token {token}"})
    return st.sampled_from([good, good, good, ("no auth", {}),
                            ("unknown token", {"UWS-Authorization": "Token 0000nosuchkey0000"}),
                            ("malformed", {"UWS-Authorization": f"Bearer {token} extra"})])


def case_strategy(operation: Any, real_ids: dict[str, list[str]]) -> st.SearchStrategy[Any]:
    """Generated cases, positive and negative, on generated ids and on real ones."""
    names = re.findall(r"{(\w+)}", operation.path)
    choices: list[dict[str, str]] = [{}]
    for name in names:
        # An id: the fuzz user's real ones, or a generated one (missing: "x").
        values = real_ids.get(name) or ["x"]
        choices = [{**c, name: v} for c in choices for v in values]
    strategies = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        strategies.append(operation.as_strategy(mode))
        if names:
            strategies += [operation.as_strategy(mode, path_parameters=c) for c in choices]
    return st.one_of(strategies).filter(lambda case: not _starts_long_job(case))


def _starts_long_job(case: Any) -> bool:
    body = case.body if isinstance(getattr(case, "body", None), dict) else {}
    return case.path.endswith("/start/") and body.get("job_type") in LONG_JOB_TYPES


def fuzz_operation(operation: Any, base_url: str, token: str,
                   real_ids: dict[str, list[str]], tally: Tally) -> None:
    session = requests.Session()

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=case_strategy(operation, real_ids), auth=auth_headers(token))
    def run(case: Any, auth: tuple[str, dict[str, str]]) -> None:
        kind, headers = auth[0], dict(auth[1])  # the transport adds to the dict it is given
        label = f"{case.method} {case.formatted_path} ({kind})"
        try:
            response = case.call(base_url=base_url, session=session, headers=headers,
                                 timeout=60, allow_redirects=False)
            tally.requests += 1
            tally.by_status[response.status_code] = \
                tally.by_status.get(response.status_code, 0) + 1
            seen = tally.by_operation.setdefault(f"{case.method} {operation.path}", {})
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            problem = envelope_problem(case.method, response)
            if response.status_code >= 400 and not problem:
                message = str(response.json()["message"])[:70]
                tally.messages[f"{case.method} {operation.path}"][message] += 1
            if problem:
                tally.failures.append(f"{label}: {problem}")
            case.validate_response(response, checks=CHECKS, headers=dict(auth[1]))
        except Exception as exc:  # a FailureGroup of every check that failed, or the call's
            tally.failures.append(f"{label}: {str(exc)[:600]}")

    try:
        run()
    finally:
        session.close()


def unlisted_methods(base_url: str, schema: dict[str, Any], token: str, tally: Tally) -> None:
    """Every method a path does not declare answers the contract's 405, unless a template
    of the same length takes it (``PUT /jobs/1/events/`` is one more invalid PUT type)."""
    headers = {"UWS-Authorization": f"Token {token}"}
    taken = {(m, path.count("/")) for path, item in schema["paths"].items() for m in item}
    for path, item in schema["paths"].items():
        url = base_url + re.sub(r"{\w+}", "1", path)
        for method in ("get", "put", "post", "delete", "patch"):
            if method in item:
                continue
            response = requests.request(method.upper(), url, headers=headers, timeout=60)
            tally.requests += 1
            tally.by_status[response.status_code] = \
                tally.by_status.get(response.status_code, 0) + 1
            problem = envelope_problem(method.upper(), response)
            if not problem and response.status_code != 405 \
                    and (method, path.count("/")) not in taken:
                problem = f"{response.status_code} instead of 405"
            if problem:
                tally.failures.append(f"{method.upper()} {path}: {problem}")


async def _real_ids(client: httpx.AsyncClient, api_client_key: str,
                    token: str) -> dict[str, list[str]]:
    """The fuzz user's own workspaces, a job and an outgoing share, for the path ids."""
    auth = {"UWS-Authorization": f"Token {token}"}
    workspaces = []
    for n in range(4):
        r = await client.post("/workspaces/", headers=auth, json={
            "name": f"fuzz{n}", "description": "fuzz target",
            "default_job_type": "local_test_job",
            "workspace_details": {"files": [{"name": "a.txt", "content": "x"}]}})
        assert r.status_code == 200, r.text
        workspaces.append(r.json()["data"]["workspace"]["id"])
    r = await client.put(f"/workspaces/{workspaces[0]}/start/", headers=auth, json={})
    assert r.status_code == 200, r.text
    job = r.json()["data"]["job"]["id"]

    await make_user_token(client, api_client_key)  # someone to share with
    r = await client.get("/users/", headers=auth, params={"search": "Tester"})
    recipients = [u["id"] for u in r.json()["data"]["users"]][:1]
    shared: list[str] = []
    if recipients:
        r = await client.post("/shared_workspaces/", headers=auth, json={
            "original_workspace_id": workspaces[1], "shared_user_ids": recipients})
        assert r.status_code == 200, r.text
        shared = [str(m["shared_workspace_id"]["id"])
                  for m in r.json()["data"]["shared_workspaces"]]
    return {"workspace_id": [str(w) for w in workspaces], "job_id": [str(job)],
            "shared_workspace_id": shared}


@pytest.mark.slow
# Schemathesis' own strategies draw from `random` internally; not ours to change.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_every_operation_answers_by_the_schema_and_the_contract(
    client: httpx.AsyncClient, server_url: str, api_client_key: str, user_token: str,
) -> None:
    raw = (await client.get("/schema/openapi.json")).json()
    schema = schemathesis.openapi.from_dict(raw)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(
        1 for item in raw["paths"].values() for m in item if m in ("get", "put", "post",
                                                                   "delete", "patch"))
    real_ids = await _real_ids(client, api_client_key, user_token)
    tally = Tally()

    def fuzz_all() -> None:
        for operation in operations:
            fuzz_operation(operation, server_url, user_token, real_ids, tally)
        unlisted_methods(server_url, raw, user_token, tally)

    await asyncio.to_thread(fuzz_all)
    print(f"\nfuzz: {len(operations)} operations, {tally.requests} requests, "
          f"statuses {dict(sorted(tally.by_status.items()))}")
    for label, seen in tally.by_operation.items():
        print(f"  {label}: {dict(sorted(seen.items()))}")
        for message, count in tally.messages[label].most_common(4):
            print(f"      {count:4d}  {message}")
    assert tally.requests >= len(operations) * min(EXAMPLES, 5)
    assert not tally.failures, "\n".join(tally.failures[:40]) + \
        f"\n({len(tally.failures)} failures)"
    await _jobs_settle(client, user_token)


async def _jobs_settle(client: httpx.AsyncClient, token: str) -> None:
    """Jobs the fuzzer started are short; wait for them so none outlives the session."""
    auth = {"UWS-Authorization": f"Token {token}"}

    async def settled() -> bool:
        jobs = (await client.get("/jobs/", headers=auth)).json()["data"]["jobs"]
        return all(j["status"] in ("complete", "failed") for j in jobs)

    await eventually(settled, timeout=120, interval=0.5)

