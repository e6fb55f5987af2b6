"""Prometheus export of the router's metrics through Ray (`ray.serve.metrics`).

`RayMetricsExporter.export(delta)` runs once per report interval, off the step loop's
hot path, and turns one `MetricsDelta` (specserve_ray/metrics.py) into Ray metric
records. Serve adds the `deployment`, `replica` and `application` tags; Ray's metrics
agent serves them on each node's metrics port with the `ray_` prefix (counters get
`_total`). Names: `specserve_` + vLLM's name where vLLM has one. README lists them all
with PromQL.
"""
from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from specserve_ray.metrics import MetricsDelta

P = "specserve_"
_LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 60.0]
_RECOVERY_BUCKETS = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]


class RayMetricsExporter:
    def __init__(self):
        c = lambda name, doc, tags=None: Counter(P + name, doc, tag_keys=tags)  # noqa: E731
        g = lambda name, doc: Gauge(P + name, doc)  # noqa: E731
        self.num_drafts = c("spec_decode_num_drafts", "Requests that drafted >= 1 token, per step (vLLM num_drafts).")
        self.num_draft_tokens = c("spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.num_accepted = c("spec_decode_num_accepted_tokens", "Draft tokens the target accepted.")
        self.accepted_per_pos = c("spec_decode_num_accepted_tokens_per_pos",
                                  "Drafts whose token at `position` (0-based) was accepted.",
                                  ("position",))
        self.num_emitted = c("spec_decode_num_emitted_tokens",
                             "Tokens emitted by decode steps (accepted + one final token per row).")
        self.decode_steps = c("decode_steps", "Steps that verified at least one running request.")
        self.decode_rows = c("decode_rows", "Requests verified, summed over decode steps.")
        self.decode_seconds = c("decode_seconds", "Wall time of decode steps, summed (exact; "
                                "Ray's histogram sums are bucket-midpoint estimates).")
        self.chosen_k_rows = c("chosen_k_rows",
                               "Decode rows by the k the policy chose (an exact histogram of k).",
                               ("k",))
        self.chosen_k_sum = c("chosen_k_sum", "Chosen k summed over decode rows (mean k = "
                              "rate(chosen_k_sum) / rate(decode_rows)).")
        self.admitted = c("requests_admitted", "Requests that joined the batch (prefilled).")
        self.finished = c("requests_finished", "Requests that finished.")
        self.predicted_s = c("step_predicted_seconds",
                             "Cost-model predicted seconds of decode-only steps (adaptive policies).")
        self.predicted_observed_s = c("step_predicted_observed_seconds",
                                      "Measured seconds of the same steps as step_predicted_seconds.")
        self.expected_tokens = c("efficiency_predicted_tokens",
                                 "Expected tokens N = B + sum c_ij of those steps (predicted).")
        self.expected_emitted = c("efficiency_observed_tokens",
                                  "Tokens those same steps actually emitted.")
        self.slo_requests = c("slo_requests", "Finished requests with an SLO.", ("slo_class",))
        self.slo_attained = c("slo_attained", "Of those, requests within TTFT and TPOT.", ("slo_class",))
        self.faults = c("fault_events", "Fault and recovery events by `event` (draft_fallback_steps, "
                        "draft_restarts, target_restarts, resumed_requests, failed_requests, "
                        "refused_<reason>, *_recovery_seconds summed ...).", ("event",))
        self.recovery = Histogram(P + "recovery_seconds", "Worker failure -> serving again "
                                  "(draft: speculation resumed; target: requests resumed), "
                                  "one observation per recovery.",
                                  boundaries=_RECOVERY_BUCKETS, tag_keys=("worker",))
        self.step_seconds = Histogram(P + "step_seconds", "Wall time of decode steps.",
                                      boundaries=_LATENCY_BUCKETS)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "TTFT of finished requests.",
                              boundaries=_LATENCY_BUCKETS, tag_keys=("slo_class",))
        self.tpot = Histogram(P + "time_per_output_token_seconds",
                              "Mean time between output tokens of finished requests.",
                              boundaries=_LATENCY_BUCKETS, tag_keys=("slo_class",))
        self.queue_depth = g("queue_depth", "Requests waiting for a batch slot.")
        self.running = g("running_requests", "Requests in the running batch.")
        self.chosen_k_mean = g("chosen_k_mean", "Mean k per decode row over the last interval.")
        self.k_cap = g("max_k_bound", "Cap on k from the cluster controller (-1: none).")
        self.enabled = g("speculation_enabled", "1 when bounds allow speculation, else 0.")
        self.budget = g("verify_budget", "Verification budget in draft tokens per step (-1: none).")
        self.eff_predicted = g("efficiency_predicted", "Predicted tokens/s of the last interval's "
                               "decode-only steps (cost model).")
        self.eff_observed = g("efficiency_observed", "Observed tokens/s of the same steps.")

    @staticmethod
    def _inc(counter, value, tags=None) -> None:
        if value > 0:                 # Ray counters reject 0 increments
            counter.inc(value, tags)

    def export(self, delta: MetricsDelta, bounds=None) -> None:
        d = delta.counts
        inc = self._inc
        inc(self.num_drafts, d.num_drafts)
        inc(self.num_draft_tokens, d.num_draft_tokens)
        inc(self.num_accepted, d.num_accepted_tokens)
        for pos, n in enumerate(d.accepted_per_pos):
            inc(self.accepted_per_pos, n, {"position": str(pos)})
        inc(self.num_emitted, d.num_emitted_tokens)
        inc(self.decode_steps, d.decode_steps)
        inc(self.decode_rows, d.decode_rows)
        inc(self.decode_seconds, d.decode_seconds)
        for k, n in d.chosen_k_rows.items():
            inc(self.chosen_k_rows, n, {"k": str(k)})
        inc(self.chosen_k_sum, d.chosen_k_sum)
        inc(self.admitted, d.admitted)
        inc(self.finished, d.finished)
        inc(self.predicted_s, d.predicted_seconds)
        inc(self.predicted_observed_s, d.predicted_observed_seconds)
        inc(self.expected_tokens, d.expected_tokens)
        inc(self.expected_emitted, d.expected_emitted)
        for name, record in d.slo.items():
            inc(self.slo_requests, record.requests, {"slo_class": name})
            inc(self.slo_attained, record.attained, {"slo_class": name})
        for event, n in d.faults.items():
            inc(self.faults, n, {"event": event})
        for worker, s in delta.recovery:
            self.recovery.observe(s, {"worker": worker})
        for s in delta.step_seconds:
            self.step_seconds.observe(s)
        for name, s in delta.ttft:
            self.ttft.observe(s, {"slo_class": name})
        for name, s in delta.tpot:
            self.tpot.observe(s, {"slo_class": name})
        self.queue_depth.set(delta.queue_depth)
        self.running.set(delta.running)
        if d.decode_rows:
            self.chosen_k_mean.set(d.chosen_k_sum / d.decode_rows)
        if d.predicted_seconds > 0 and d.predicted_observed_seconds > 0:
            self.eff_predicted.set(d.expected_tokens / d.predicted_seconds)
            self.eff_observed.set(d.expected_emitted / d.predicted_observed_seconds)
        if bounds is not None:
            self.enabled.set(1 if bounds.speculation_enabled else 0)
            self.k_cap.set(-1 if bounds.max_k is None else bounds.max_k)
            self.budget.set(-1 if bounds.verify_budget is None else bounds.verify_budget)
