"""Prometheus metrics, one registry per app (no module globals for tests to reset)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tessera_http_requests_total", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("tessera_http_request_duration_seconds", "Request latency",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.logins = Counter("tessera_logins_total", "Login attempts by outcome", ["outcome"],
                              registry=self.registry)
        self.sessions_issued = Counter("tessera_sessions_issued_total", "Sessions issued",
                                       registry=self.registry)
        self.sessions_revoked = Counter("tessera_sessions_revoked_total", "Sessions deleted",
                                        ["reason"], registry=self.registry)
        # Mail (the outbox worker): waiting now, oldest wait, sent, failed attempts.
        self.mail_queued = Gauge("tessera_mail_queued", "Mails waiting in the outbox",
                                 registry=self.registry)
        self.mail_oldest_queued_age = Gauge(
            "tessera_mail_oldest_queued_age_seconds", "Age of the oldest mail still waiting",
            registry=self.registry)
        self.mails_sent = Counter("tessera_mails_sent_total", "Mails handed to the transport",
                                  ["kind"], registry=self.registry)
        self.mail_failures = Counter(
            "tessera_mail_failures_total", "Failed mail attempts (retry: tried again later; "
            "given_up: no more attempts)", ["kind", "outcome"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts requests and latency by route template (never by raw path: ids stay out)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
