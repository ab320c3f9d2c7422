"""Prometheus metrics: the API's ``/metrics``, the worker's Temporal runtime metrics and
its job-count exporter."""

from __future__ import annotations

import secrets

import httpx
import websockets
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import count_relayed
from app.worker_metrics import job_count_exporter, telemetry_runtime
from core.temporal import connect
from db import accounts
from db.tables import Job
from tests.api.test_live_status import ws_url
from tests.conftest import eventually, free_port


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels``, if any."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return s.value
    return None


async def scrape(client: httpx.AsyncClient) -> str:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    return r.text


async def test_requests_counted_by_route_template(client, auth) -> None:
    before = sample(await scrape(client), "uws_http_requests_total",
                    route="/workspaces/", method="GET", status="200") or 0
    for _ in range(2):
        assert (await client.get("/workspaces/", headers=auth)).status_code == 200
    assert (await client.get("/workspaces/123456789/", headers=auth)).status_code == 200
    text = await scrape(client)
    assert sample(text, "uws_http_requests_total", route="/workspaces/", method="GET",
                  status="200") == before + 2
    # The template, never the id: one series for every workspace.
    assert sample(text, "uws_http_requests_total", route="/workspaces/{workspace_id}/",
                  method="GET", status="200")
    routes = {s.labels["route"] for family in text_string_to_metric_families(text)
              for s in family.samples if s.name == "uws_http_requests_total"}
    assert not any("123456789" in route for route in routes)
    assert sample(text, "uws_http_request_duration_seconds_bucket", route="/workspaces/",
                  method="GET", le="+Inf") >= 2
    assert sample(text, "uws_websocket_subscribers") is not None
    assert sample(text, "uws_passthrough_bytes_total", direction="to_client") is not None


async def test_unmatched_and_refused_requests(client) -> None:
    assert (await client.get(f"/no/such/{secrets.token_hex(4)}/")).status_code == 404
    refused = await client.get("/workspaces/", headers={"UWS-Authorization": "Token nope"})
    assert refused.status_code == 401
    text = await scrape(client)
    assert sample(text, "uws_http_requests_total", route="unmatched", method="GET",
                  status="404") >= 1
    assert sample(text, "uws_http_requests_total", route="/workspaces/", method="GET",
                  status="401") >= 1


async def test_metrics_needs_no_auth_and_no_slash(client) -> None:
    r = await client.get("/metrics")  # httpx does not follow redirects: a 301 would show
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE uws_http_requests_total counter" in r.text


async def test_websocket_subscribers_gauge(client, server_url, user_token) -> None:
    async def gauge() -> float:
        return sample(await scrape(client), "uws_websocket_subscribers")

    before = await gauge()
    async with websockets.connect(ws_url(server_url, f"/jobs/?token={user_token}")):
        await eventually(lambda: _at_least(gauge, before + 1), timeout=10)
    await eventually(lambda: _at_most(gauge, before), timeout=10)


async def _at_least(get, value: float) -> bool:
    return await get() >= value


async def _at_most(get, value: float) -> bool:
    return await get() <= value


async def test_relayed_bytes_counted_both_ways() -> None:
    sent: list[dict] = []
    incoming = iter([{"type": "http.request", "body": b"abc", "more_body": True},
                     {"type": "websocket.receive", "text": "été"}])

    async def receive() -> dict:
        return next(incoming)

    async def send(message: dict) -> None:
        sent.append(message)

    def relayed(direction: str) -> float:
        return REGISTRY.get_sample_value("uws_passthrough_bytes_total",
                                         {"direction": direction})

    up, down = relayed("to_session"), relayed("to_client")
    counting_receive, counting_send = count_relayed(receive, send)
    await counting_receive()
    await counting_receive()
    await counting_send({"type": "http.response.start", "status": 200, "headers": []})
    await counting_send({"type": "http.response.body", "body": b"0123456789"})
    await counting_send({"type": "websocket.send", "bytes": b"xy"})
    assert relayed("to_session") - up == 3 + len("été".encode())
    assert relayed("to_client") - down == 12
    assert len(sent) == 3  # every message passed on


async def test_worker_runtime_exports_temporal_metrics(temporal_env, settings) -> None:
    port = free_port()
    target = temporal_env.client.service_client.config.target_host
    client = await connect(settings.model_copy(update={"temporal_address": target}),
                           telemetry_runtime(port, host="127.0.0.1"))
    await client.count_workflows()  # one RPC besides the connection's own

    async def exported() -> str | None:
        async with httpx.AsyncClient() as http:
            body = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        return body if "temporal_request" in body else None

    assert "temporal_request" in await eventually(exported, timeout=10)


async def test_job_counts_exported_by_status_and_resource(engine, user_token) -> None:
    user_id, _ = await accounts.token_user(user_token)
    resource = f"metrics-{secrets.token_hex(4)}"
    await Job.insert(*(Job(user=user_id, job_type="local_test_job", resource_name=resource,
                           status=status) for status in ("complete", "complete", "failed")))
    port = free_port()
    try:
        async with job_count_exporter(port, host="127.0.0.1"), httpx.AsyncClient() as http:
            async def counted() -> str | None:
                text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                return text if resource in text else None

            text = await eventually(counted, timeout=10)
    finally:
        await Job.delete().where(Job.resource_name == resource)
    assert sample(text, "uws_jobs", status="complete", resource=resource) == 2
    assert sample(text, "uws_jobs", status="failed", resource=resource) == 1
    assert "uws_http_requests_total" not in text  # its own registry, not the API's
