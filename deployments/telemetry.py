"""RouterTelemetry: a router's metrics export and controller reports, off the step loop.

    step loop ──on_step──> StepRecorder ──> MetricsAggregator      (per step: additions)
    every report_interval_s (background task):
        drain ──> RayMetricsExporter.export       (Prometheus via Ray)
              ──> RouterSignals (windowed) ──> SpecController.report ──> engine.chooser.apply_bounds

Both loops are asyncio tasks on the replica's event loop; the report waits at most
`controller_timeout_s` and never holds the step loop up.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time

from specserve_ray.config import SignalsConfig
from specserve_ray.metrics import MetricsDelta
from specserve_ray.policy.cluster import RouterSignals, bounds_to_dict
from specserve_ray.recorder import StepRecorder, slo_budgets

from deployments.controller import ControllerClient

log = logging.getLogger("specserve_ray")


class RouterTelemetry:
    def __init__(self, serving, cfg: SignalsConfig, router_id: str, controller_name: str,
                 exporter=None):
        self.serving, self.engine, self.cfg = serving, serving.engine, cfg
        self.router_id = router_id
        self.recorder = StepRecorder(engine=self.engine)
        serving.on_step = self.recorder
        serving.faults.on_event = self.recorder.aggregator.observe_fault   # exported too
        self.exporter = exporter
        self.client = None
        if cfg.controller:
            self.client = ControllerClient(
                controller_name, rule=cfg.rule, report_interval_s=cfg.report_interval_s,
                timeout_s=cfg.controller_timeout_s, retry_s=cfg.controller_retry_s)
        self.latest: RouterSignals | None = None
        self.last_delta: MetricsDelta | None = None
        self._waiting_before = 0
        self._tasks: list[asyncio.Task] = []
        self._export_failed = False

    def start(self) -> None:
        """Start the background loops (idempotent; needs the replica's running loop)."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._metrics_loop()))
        if self.client is not None:
            self._tasks.append(loop.create_task(self._controller_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks = []

    # -- every interval -------------------------------------------------------------------
    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.report_interval_s)
            self.collect()

    def collect(self) -> MetricsDelta:
        """Drain the aggregator, export, and compute this window's RouterSignals."""
        eng = self.engine
        waiting, running = len(eng.waiting), len(eng.running)
        delta = self.recorder.aggregator.drain(time.monotonic(), waiting, running)
        if self.exporter is not None:
            try:
                self.exporter.export(delta, eng.chooser.bounds)
            except Exception:  # noqa: BLE001 - never let metrics take the router down
                if not self._export_failed:
                    self._export_failed = True
                    log.exception("metrics export failed (logged once)")
        self.latest = self._signals(delta, waiting, running)
        self.last_delta = delta
        return delta

    def _signals(self, delta: MetricsDelta, waiting: int, running: int) -> RouterSignals:
        d = delta.counts
        # Arrivals are not counted on the request path (no edit there): what joined the
        # batch plus how much the queue grew explains every accepted request.
        arrivals = d.admitted + max(waiting - self._waiting_before, 0)
        self._waiting_before = waiting
        tightest = min((slo_budgets(r, self.recorder.slo_registry)[1] for r in self.engine.running),
                       default=math.inf)
        slo_req = sum(c.requests for c in d.slo.values())
        slo_ok = sum(c.attained for c in d.slo.values())
        return RouterSignals(
            router_id=self.router_id, window_s=max(delta.window_s, 1e-3), arrivals=arrivals,
            finished=d.finished, queue_depth=waiting, running=running,
            capacity=self.engine.limits.max_num_seqs, decode_steps=d.decode_steps,
            decode_rows=d.decode_rows, decode_seconds=d.decode_seconds,
            num_drafts=d.num_drafts, num_draft_tokens=d.num_draft_tokens,
            num_accepted_tokens=d.num_accepted_tokens,
            accepted_first_pos=d.accepted_per_pos[0] if d.accepted_per_pos else 0,
            max_k=self.engine.speculation.num_speculative_tokens, tightest_tpot_s=tightest,
            slo_requests=slo_req, slo_attained=slo_ok)

    async def _controller_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.report_interval_s)
            if self.latest is None:
                continue
            bounds = await self.client.report(self.latest)
            if bounds is not None and bounds != self.engine.chooser.bounds:
                # No lock needed: planning is synchronous on this same event loop, so
                # every plan sees either the old bounds or the new ones, never a mix.
                self.engine.chooser.apply_bounds(bounds)

    # -- views ----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Totals since start (metrics as a dict), current bounds and controller state."""
        out = {"totals": self.recorder.aggregator.current().summary(),
               "bounds": bounds_to_dict(self.engine.chooser.bounds),
               "queue_depth": len(self.engine.waiting), "running": len(self.engine.running)}
        if self.client is not None:
            out["controller"] = {"name": self.client.name, "available": not self.client.failing,
                                 "failures": self.client.failures,
                                 "bounds_version": self.client.version}
        return out

    def autoscaling_stats(self) -> dict[str, float]:
        """Plain numbers for Serve's custom autoscaling policy (deployments/autoscaling.py);
        0 stands for "none" (no decode steps, no TPOT budget)."""
        s = self.latest
        step = s.decode_seconds / s.decode_steps if s is not None and s.decode_steps else 0.0
        tpot = s.tightest_tpot_s if s is not None and math.isfinite(s.tightest_tpot_s) else 0.0
        return {"running": float(len(self.engine.running)),
                "queue_depth": float(len(self.engine.waiting)),
                "capacity": float(self.engine.limits.max_num_seqs),
                "step_s": float(step), "tpot_budget_s": float(tpot)}
