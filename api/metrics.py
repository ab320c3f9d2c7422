"""Prometheus metrics of one API process, served at ``GET /metrics``.

Each process has its own default registry (replicas are scraped one by one). Requests are
counted by route template, never by raw path, so label cardinality stays bounded.

:class:`RequestMetrics` wraps Litestar's ASGI handler (inside ``Litestar.__call__``, around
its router and exception handler): it sees every request that reaches Litestar, unmatched
ones and those refused by middleware included, with the status actually sent. The trailing
slash redirect of ``AppendSlash`` answers before Litestar and is not counted.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

from litestar import Litestar, Response, get
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import (
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from api.slashes import _NO_REDIRECT_PREFIXES

UNMATCHED = "unmatched"
# generate_latest() writes the classic text format; every Prometheus version reads it.
# Litestar appends "; charset=utf-8" to text/ media types.
MEDIA_TYPE = "text/plain; version=0.0.4"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
                      "CONNECT"})
# API requests take about a millisecond: finer buckets than the default at the low end.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, float("inf"))

# No "_created" series beside every counter and histogram: they would double the series
# scraped and Prometheus does not need them for rates.
disable_created_metrics()

HTTP_REQUESTS = Counter("uws_http_requests", "HTTP requests by route template, method and "
                        "status code.", ["route", "method", "status"])
HTTP_LATENCY = Histogram("uws_http_request_duration_seconds", "Time from the request's "
                         "arrival to the end of its handling (streamed bodies included).",
                         ["route", "method"], buckets=_BUCKETS)
WEBSOCKET_SUBSCRIBERS = Gauge("uws_websocket_subscribers", "Open job-status WebSockets "
                              "(/jobs/ and /jobs/<id>/) subscribed to the event bus.")
_PASSTHROUGH_BYTES = Counter("uws_passthrough_bytes", "Body and WebSocket message bytes "
                             "relayed through /passthrough/.", ["direction"])
PASSTHROUGH_TO_SESSION = _PASSTHROUGH_BYTES.labels("to_session")
PASSTHROUGH_TO_CLIENT = _PASSTHROUGH_BYTES.labels("to_client")


class RequestMetrics:
    """Pure ASGI middleware counting HTTP requests and timing them.

    Per request: two clock reads, a wrapped ``send``, two dict lookups for the metric
    children (cached by label values), one increment and one observation.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: dict[Any, str] = {None: UNMATCHED}
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        status = 500  # what the server answers when the app raises before responding

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._observe(scope, status, perf_counter() - start)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = self._route(scope)
        method = scope["method"]
        if method not in _METHODS:  # clients may send any token: keep the label bounded
            method = "other"
        counter = self._counters.get((route, method, status))
        if counter is None:
            counter = self._counters[route, method, status] = HTTP_REQUESTS.labels(
                route, method, str(status))
        counter.inc()
        histogram = self._histograms.get((route, method))
        if histogram is None:
            histogram = self._histograms[route, method] = HTTP_LATENCY.labels(route, method)
        histogram.observe(seconds)

    def _route(self, scope: Scope) -> str:
        # Litestar's router sets path_template (e.g. "/workspaces/{workspace_id}"); a mount
        # gets "" there, so its handler names it. Unmatched requests have neither (None).
        key = scope.get("path_template") or scope.get("route_handler")
        route = self._routes.get(key)
        if route is None:
            template = key if isinstance(key, str) else min(key.paths)
            route = self._routes[key] = contract_form(template)
        return route


def contract_form(template: str) -> str:
    """A template as the contract writes its paths: with a trailing slash (Litestar drops
    it), except for the paths that never had one."""
    if template == "/" or template.startswith(_NO_REDIRECT_PREFIXES):
        return template
    return template + "/"


def count_relayed(receive: Receive, send: Send) -> tuple[Receive, Send]:
    """``receive``/``send`` that count the body and message bytes going through them, for
    the passthrough relay (HTTP bodies and WebSocket messages, both directions)."""
    to_session = PASSTHROUGH_TO_SESSION.inc
    to_client = PASSTHROUGH_TO_CLIENT.inc

    async def counting_receive() -> Message:
        message = await receive()
        size = _payload_size(message)
        if size:
            to_session(size)
        return message

    async def counting_send(message: Message) -> None:
        size = _payload_size(message)
        if size:
            to_client(size)
        await send(message)

    return counting_receive, counting_send


def _payload_size(message: Message) -> int:
    data = message.get("body") or message.get("bytes")
    if data:
        return len(data)
    text = message.get("text")
    if not text:
        return 0
    return len(text) if text.isascii() else len(text.encode())  # isascii() is O(1)


@get("/metrics", include_in_schema=False)
async def metrics_endpoint() -> Response[bytes]:
    """This process's metrics in the Prometheus text format (unauthenticated)."""
    return Response(generate_latest(), media_type=MEDIA_TYPE)


def instrument(app: Litestar) -> Litestar:
    """Put the request metrics around a Litestar app's router and exception handler (as
    Litestar does with OpenTelemetry's middleware): middleware of the app's own list runs
    after routing, so it would never see unmatched requests."""
    app.asgi_handler = RequestMetrics(app.asgi_handler)
    return app


__all__ = ["WEBSOCKET_SUBSCRIBERS", "RequestMetrics", "count_relayed", "instrument",
           "metrics_endpoint"]
