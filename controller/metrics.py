"""Prometheus metrics of one leasectl process, in a registry of its own.

The reconciler, applier, GC, execution dispatcher and the provider's request hook record here; the
daemon's HTTP server exposes :attr:`Metrics.registry` on ``/metrics``. Tests build their own
``Metrics()`` and read values back with :meth:`Metrics.value`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from models import EXECUTION_STATES, PHASES


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.passes = Counter("leasectl_passes", "Reconcile passes, by result.", ["result"], registry=r)
        self.pass_duration = Histogram(
            "leasectl_pass_duration_seconds",
            "Wall time of one reconcile pass.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.actions = Counter(
            "leasectl_actions", "Sandbox actions, by kind and result.", ["kind", "result"], registry=r
        )
        self.leases = Gauge("leasectl_leases", "Leases by phase after the last pass.", ["phase"], registry=r)
        self.stuck = Gauge(
            "leasectl_leases_stuck",
            "Leases whose sandbox has been in a transitional state (starting, creating, ...) for longer "
            "than controller.stuck_after_seconds, after the last pass.",
            registry=r,
        )
        self.api_requests = Counter(
            "leasectl_api_requests",
            "Daytona API requests, by operation and outcome.",
            ["operation", "outcome"],
            registry=r,
        )
        self.orphans_collected = Counter(
            "leasectl_orphans_collected", "Orphaned sandboxes deleted by GC.", registry=r
        )
        self.executions = Gauge(
            "leasectl_executions", "Executions by state (last count).", ["state"], registry=r
        )
        self.leader = Gauge("leasectl_leader", "1 while this replica is the leader.", registry=r)
        self.pool_members = Gauge(
            "leasectl_pool_members",
            "Pool members after the last pass, by pool and standing "
            "(ready, claimed, provisioning, failing, retiring).",
            ["pool", "state"],
            registry=r,
        )
        self.claims = Counter(
            "leasectl_claims",
            "Claims made by this process, by pool and kind (warm, cold, failed).",
            ["pool", "kind"],
            registry=r,
        )
        self.claim_seconds = Histogram(
            "leasectl_claim_seconds",
            "Time from a claim request to its answer, by kind (warm, cold, failed).",
            ["kind"],
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        for phase in PHASES:
            self.leases.labels(phase=phase).set(0)
        for state in EXECUTION_STATES:
            self.executions.labels(state=state).set(0)

    def record_request(self, operation: str, outcome: str) -> None:
        self.api_requests.labels(operation=operation, outcome=outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else float(found)
