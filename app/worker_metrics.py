"""The worker's metrics: Temporal SDK runtime metrics, and job counts from the database,
each on its own Prometheus port (both off unless configured)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from db import jobs as job_rows

log = logging.getLogger("uws.worker")

# Metrics ports listen on every interface: Prometheus scrapes from another host/container.
METRICS_HOST = "0.0.0.0"
JOB_COUNTS_SECONDS = 15.0


def telemetry_runtime(port: int, host: str = METRICS_HOST) -> Runtime:
    """A Temporal runtime whose SDK metrics (polls, task slots and latencies, RPCs)
    Prometheus scrapes at ``host:port``."""
    prometheus = PrometheusConfig(bind_address=f"{host}:{port}")
    return Runtime(telemetry=TelemetryConfig(metrics=prometheus))


class JobCounts(Collector):
    """The ``uws_jobs`` gauge: job rows by status and resource, as of the last refresh.

    A collector over a snapshot rather than a labelled Gauge: the exporter thread always
    sees one whole refresh, and combinations that no longer exist disappear."""

    def __init__(self) -> None:
        self._rows: list[tuple[str, str, int]] = []

    async def refresh(self) -> None:
        self._rows = await job_rows.counts()

    async def refresh_forever(self, interval: float = JOB_COUNTS_SECONDS) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # the database may be briefly away: keep the last counts
                log.warning("cannot count jobs for metrics: %s", exc)
            await asyncio.sleep(interval)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("uws_jobs", "Job rows by status and resource.",
                                   labels=["status", "resource"])
        for status, resource, count in self._rows:
            family.add_metric([status, resource], count)
        yield family


@contextlib.asynccontextmanager
async def job_count_exporter(port: int | None, host: str = METRICS_HOST
                             ) -> AsyncIterator[JobCounts | None]:
    """Serve :class:`JobCounts` on ``host:port`` (its own registry, nothing else) while
    refreshing it in the background; nothing when ``port`` is None."""
    if port is None:
        yield None
        return
    counts = JobCounts()
    registry = CollectorRegistry()
    registry.register(counts)
    server, _ = start_http_server(port, addr=host, registry=registry)
    task = asyncio.create_task(counts.refresh_forever(), name="job-count-metrics")
    try:
        yield counts
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(server.shutdown)  # waits for its serving loop to notice
        server.server_close()
