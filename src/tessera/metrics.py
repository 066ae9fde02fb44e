"""Prometheus metrics, one registry per app (no module globals for tests to reset)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


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
