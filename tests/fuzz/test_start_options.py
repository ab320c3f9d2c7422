"""Property test over HTTP: any JSON value as ``resource_options`` of a real start either
starts the job or answers the contract's 422 with exactly the errors the contract's rules
give (written out in ``test_parameter_properties.expected_errors``); never a 5xx.
Accepted starts really run a LocalTestJob (1 s); the test waits for them to end.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import TEST_CONFIG, eventually
from tests.fuzz.test_parameter_properties import expected_errors, json_values

EXAMPLES = int(os.environ.get("UWS_FUZZ_EXAMPLES", "25"))
NAMES = ["num_cpus", "memory_mb", "time_limit_min", "gpu_enabled"]
options = st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=6), json_values,
                          max_size=5)


@pytest.mark.slow
async def test_any_resource_options_start_or_answer_422(
    client: httpx.AsyncClient, server_url: str, auth: dict[str, str]
) -> None:
    from core.config import load_config

    params = load_config(TEST_CONFIG).parameters
    r = await client.post("/workspaces/", headers=auth, json={
        "name": "options", "description": "d", "default_job_type": "local_test_job"})
    wid = r.json()["data"]["workspace"]["id"]
    seen: dict[int, int] = {}
    failures: list[str] = []

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(given_options=options)
    def start(given_options: dict[str, Any]) -> None:
        r = requests.put(f"{server_url}/workspaces/{wid}/start/", headers=auth,
                         json={"resource_options": given_options}, timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        errors = expected_errors(given_options, params)
        if errors:
            wanted = (422, {"success": False,
                            "message": f"Invalid resource options found: {errors}"})
            if (r.status_code, r.json()) != wanted:
                failures.append(f"{given_options!r}: {r.status_code} {r.text[:300]}")
        elif r.status_code != 200 and not (
                r.status_code == 400 and "quota" in r.json()["message"].lower()):
            failures.append(f"{given_options!r}: {r.status_code} {r.text[:300]}")

    await asyncio.to_thread(start)
    print(f"\nstart with fuzzed resource_options: statuses {seen}")
    assert not failures, "\n".join(failures[:20])
    assert seen.get(422) and seen.get(200), seen  # both answers were reached

    async def ended() -> bool:
        r = await client.get("/jobs/", headers=auth, params={"workspace_id": wid})
        return all(j["status"] in ("complete", "failed") for j in r.json()["data"]["jobs"])

    await eventually(ended, timeout=120, interval=0.5)
