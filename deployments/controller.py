"""SpecController: one named Ray actor per app that turns every router's signals into
cluster-wide speculation bounds.

    router 1 ──report(signals)──┐                        ┌── bounds ──> router 1
    router 2 ──report(signals)──┼──> SpecController ─────┼── bounds ──> router 2
    router N ──report(signals)──┘   ClusterSignals.aggregate  (each report's reply)
                                    ClusterBounds.update (pure rule, policy/cluster.py)

Each router reports every `report_interval_s` from a background task and gets the
current bounds back in the same reply (one round trip per interval, never on the step
loop). The controller re-decides at most once per interval, over the latest report of
every router that reported within `3 * report_interval_s` (a router that stopped
reporting, e.g. scaled down, drops out).

Lifetime: the first router to connect creates the actor (`get_if_exists`), not detached,
so it lives and dies with the app's routers. If it dies (its owner scaled down, a crash,
`ray.kill`), routers keep their last bounds, log once, and the next retry recreates it;
its state is soft (the latest windowed reports), rebuilt within one interval.
"""
from __future__ import annotations

import asyncio
import logging
import time

import ray

from specserve_ray.policy.cluster import (ClusterBounds, ClusterBoundsConfig, ClusterSignals,
                                          RouterSignals, bounds_from_dict, bounds_to_dict)
from specserve_ray.contracts import RuntimeBounds

log = logging.getLogger("specserve_ray")
NAMESPACE = "specserve"


def controller_name(app_name: str | None) -> str:
    return f"SpecController:{app_name or 'default'}"


@ray.remote(num_cpus=0)
class SpecController:
    def __init__(self, rule: dict | None = None, report_interval_s: float = 1.0):
        self.rule = ClusterBounds(ClusterBoundsConfig(**(rule or {})))
        self.interval = report_interval_s
        self.reports: dict[str, tuple[RouterSignals, float]] = {}
        self.last_update = -float("inf")
        self.version = 0
        self.cluster = ClusterSignals()

    def report(self, signals: dict) -> dict:
        """Store one router's signals; re-decide if an interval has passed; reply bounds."""
        report = RouterSignals.from_dict(signals)
        now = time.monotonic()
        self.reports[report.router_id] = (report, now)
        if now - self.last_update >= 0.9 * self.interval:
            self.update(now)
        return self.published()

    def update(self, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        self.last_update = now
        stale = [rid for rid, (_, seen) in self.reports.items() if now - seen > 3 * self.interval]
        for rid in stale:
            del self.reports[rid]
        self.cluster = ClusterSignals.aggregate(r for r, _ in self.reports.values())
        if self.rule.update(self.cluster):
            self.version += 1
            log.info("speculation bounds v%d: %s (%s)", self.version,
                     bounds_to_dict(self.rule.bounds), self.rule.reason)
        return self.published()

    def published(self) -> dict:
        return {"version": self.version, "bounds": bounds_to_dict(self.rule.bounds),
                "reason": self.rule.reason}

    def snapshot(self) -> dict:
        """What the controller knows: routers, the aggregate, the rule's state."""
        c = self.cluster
        return {**self.published(), "routers": sorted(self.reports), "level": self.rule.level,
                "arrival_rate": c.arrival_rate, "queue_depth": c.queue_depth,
                "running": c.running, "capacity": c.capacity, "mean_step_s": c.mean_step_s,
                "attainment": c.attainment, "first_pos_acceptance": c.first_pos_acceptance}

    def ping(self) -> bool:
        return True


class ControllerClient:
    """A router's side: report, apply what comes back, survive the controller's absence.

    Any failure (not started, killed, slower than `timeout_s`) leaves the caller's last
    bounds in place: `report` returns None, the failure is logged once, and the next
    attempt waits `retry_s`. Connecting (a GCS lookup / actor creation) runs in a thread,
    so nothing here blocks the event loop the step loop shares.
    """

    def __init__(self, name: str, *, rule: dict | None = None, report_interval_s: float = 1.0,
                 timeout_s: float = 2.0, retry_s: float = 5.0, create: bool = True,
                 namespace: str = NAMESPACE):
        self.name, self.namespace = name, namespace
        self.rule, self.interval = rule or {}, report_interval_s
        self.timeout_s, self.retry_s, self.create = timeout_s, retry_s, create
        self.startup_timeout_s = 30.0
        self._actor = None
        self._retry_at = 0.0
        self.failing = False
        self.failures = 0
        self.version: int | None = None

    def _connect(self):
        if self.create:
            return SpecController.options(
                name=self.name, namespace=self.namespace, get_if_exists=True,
                max_concurrency=1).remote(self.rule, self.interval)
        return ray.get_actor(self.name, namespace=self.namespace)

    async def report(self, signals: RouterSignals) -> RuntimeBounds | None:
        """Send signals; the controller's bounds, or None when it is unavailable."""
        now = time.monotonic()
        if now < self._retry_at:
            return None
        try:
            timeout = self.timeout_s
            if self._actor is None:
                self._actor = await asyncio.to_thread(self._connect)
                # A freshly created actor needs its worker process first (seconds).
                timeout = max(timeout, self.startup_timeout_s)
            reply = await asyncio.wait_for(self._actor.report.remote(signals.to_dict()), timeout)
            bounds = bounds_from_dict(reply["bounds"])
        except Exception as exc:  # noqa: BLE001 - any failure means "keep the last bounds"
            self.failures += 1
            self._actor = None            # look it up (or recreate it) on the next try
            self._retry_at = now + self.retry_s
            if not self.failing:
                self.failing = True
                log.warning("speculation controller %r unavailable (%s: %s); keeping the "
                            "last bounds and retrying every %.0f s", self.name,
                            type(exc).__name__, exc, self.retry_s)
            return None
        if self.failing:
            self.failing = False
            log.info("speculation controller %r reachable again", self.name)
        self.version = reply.get("version")
        return bounds
