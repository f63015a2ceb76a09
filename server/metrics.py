"""Every Prometheus metric of the server, declared here once (prefix dalorra_, base units, bounded labels).

Ratios (ECE, accuracy, abstain rate) are left to PromQL: we export numerators and denominators as counters.
ECE over a window, exact:  Σ_bin |Δ confidence_total − Δ correct_total| / Σ_bin Δ predictions_total.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from adapters.calibration import N_BINS, confidence_bin

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
UNIT_BUCKETS = tuple(i / 20 for i in range(1, 21))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "dalorra_requests_total", "Prediction items by outcome.", ["adapter", "outcome"], registry=r
        )
        self.latency = Histogram(
            "dalorra_request_latency_seconds",
            "End-to-end latency of one item.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "dalorra_queue_wait_seconds", "Time from enqueue to scored.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "dalorra_batch_rows",
            "Rows (requests × samples) per backend call.",
            buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640),
            registry=r,
        )
        self.batch_requests = Histogram(
            "dalorra_batch_requests",
            "Requests per backend call.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.backend_calls = Counter("dalorra_backend_calls_total", "Backend scoring calls.", registry=r)
        self.backend_seconds = Counter(
            "dalorra_backend_seconds_total", "Time spent in backend calls.", registry=r
        )
        self.queue_depth = Gauge("dalorra_queue_depth_rows", "Rows waiting in the batcher queue.", registry=r)
        self.samples = Counter(
            "dalorra_samples_total", "Mask samples in answers (cache hits included).", ["adapter"], registry=r
        )
        self.cache_hits = Counter(
            "dalorra_cache_hits_total",
            "Requests answered from the seeded-result cache.",
            ["adapter"],
            registry=r,
        )
        self.confidence = Histogram(
            "dalorra_confidence",
            "Top-1 probability of answered items.",
            ["adapter"],
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.entropy = Histogram(
            "dalorra_entropy_normalized",
            "Predictive entropy / log K.",
            ["adapter"],
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.epistemic = Histogram(
            "dalorra_epistemic_normalized",
            "Mutual information / log K.",
            ["adapter"],
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.abstentions = Counter(
            "dalorra_abstentions_total", "Abstain decisions by reason.", ["adapter", "reason"], registry=r
        )
        self.feedback = Counter("dalorra_feedback_total", "Feedback by outcome.", ["outcome"], registry=r)
        self.cal_n = Counter(
            "dalorra_calibration_predictions_total",
            "Labelled predictions per confidence bin.",
            ["adapter", "bin"],
            registry=r,
        )
        self.cal_conf = Counter(
            "dalorra_calibration_confidence_total",
            "Σ confidence per bin (labelled).",
            ["adapter", "bin"],
            registry=r,
        )
        self.cal_correct = Counter(
            "dalorra_calibration_correct_total",
            "Correct labelled predictions per bin.",
            ["adapter", "bin"],
            registry=r,
        )
        # Generated answers (/v1/completions, /v1/chat/completions); confidence = exp(mean log p̄(y_t)).
        self.gen_requests = Counter(
            "dalorra_generation_requests_total",
            "Generation requests (/v1/completions, /v1/chat/completions without choices) by outcome: ok, "
            "invalid, rejected, unsupported, unavailable, timeout, cancelled, error.",
            ["adapter", "outcome"],
            registry=r,
        )
        self.gen_tokens = Counter(
            "dalorra_generated_tokens_total", "Tokens generated (all choices).", ["adapter"], registry=r
        )
        self.gen_prompt_tokens = Counter(
            "dalorra_generation_prompt_tokens_total", "Prompt tokens of generations.", ["adapter"], registry=r
        )
        self.echo_tokens = Counter(
            "dalorra_prompt_logprob_tokens_total",
            "Prompt tokens scored for their log-probabilities (completions with echo and logprobs).",
            ["adapter"],
            registry=r,
        )
        self.gen_confidence = Histogram(
            "dalorra_generation_confidence",
            "Geometric-mean token probability of generated answers under the mask average.",
            ["adapter"],
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.gen_epistemic = Histogram(
            "dalorra_generation_epistemic_nats",
            "Mean per-token mutual information of generated answers (nats).",
            ["adapter"],
            buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3),
            registry=r,
        )
        self.gen_abstentions = Counter(
            "dalorra_generation_abstentions_total",
            "Abstain decisions on generated answers by reason.",
            ["adapter", "reason"],
            registry=r,
        )
        self.gen_slots = Gauge("dalorra_generation_slots_busy", "Generation slots in use.", registry=r)
        self.adapters_loaded = Gauge("dalorra_adapters_loaded", "Adapters currently loaded.", registry=r)
        self.ready = Gauge("dalorra_ready", "1 when the server is ready.", registry=r)
        self.build_info = Gauge(
            "dalorra_build_info",
            "1, labelled with the server's version, backend and dtype.",
            ["version", "backend", "dtype"],
            registry=r,
        )
        self.gen_ttft = Histogram(
            "dalorra_generation_time_to_first_token_seconds",
            "From a streamed generation's admission to its first token.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.gen_tpot = Histogram(
            "dalorra_generation_time_per_output_token_seconds",
            "Decoding seconds per generated token (uncertainty pass excluded).",
            ["adapter"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        # Inputs unlike the calibration split and the label-free shift monitor (adapters/shift.py)
        self.unfamiliarity = Histogram(
            "dalorra_unfamiliarity",
            "Per-request unfamiliarity p-value (uniform on in-distribution traffic).",
            ["adapter"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.unfamiliar = Counter(
            "dalorra_unfamiliar_total",
            "Requests whose unfamiliarity is below the level α_u.",
            ["adapter"],
            registry=r,
        )
        self.shift_statistic = Gauge(
            "dalorra_shift_statistic",
            "Largest conformal test martingale among the monitor's components in the current test period "
            "(1 at its start; alarm at the threshold C/alpha).",
            ["adapter"],
            registry=r,
        )
        self.shift_component = Gauge(
            "dalorra_shift_component_statistic",
            "Each component's conformal test martingale (extremeness, or one tail of one score: epistemic_high, "
            "epistemic_low, entropy_high, entropy_low).",
            ["adapter", "component"],
            registry=r,
        )
        self.shift_threshold = Gauge(
            "dalorra_shift_threshold",
            "The statistic's alarm threshold C/alpha (C components, Bonferroni).",
            ["adapter"],
            registry=r,
        )
        self.shift_alarm = Gauge(
            "dalorra_shift_alarm",
            "1 when the shift test raised its alarm in this period.",
            ["adapter"],
            registry=r,
        )
        self.shift_observed = Gauge(
            "dalorra_shift_observed_requests",
            "Requests in the current shift test period.",
            ["adapter"],
            registry=r,
        )
        self.accuracy_estimate = Gauge(
            "dalorra_accuracy_estimate",
            "Label-free accuracy estimate over the recent window: average thresholded confidence (share of requests with "
            "normalised entropy below a threshold fitted on the calibration items), or mean calibrated confidence for older records.",
            ["adapter"],
            registry=r,
        )

    def observe_shift(self, adapter: str, unfamiliarity: float, alpha: float, state: object | None) -> None:
        """One request's unfamiliarity and, when the adapter has a monitor, its new state (MonitorState)."""
        self.unfamiliarity.labels(adapter).observe(unfamiliarity)
        if unfamiliarity < alpha:
            self.unfamiliar.labels(adapter).inc()
        if state is not None:
            self.shift_statistic.labels(adapter).set(min(state.statistic, 1e300))
            for name, value in state.components:
                self.shift_component.labels(adapter, name).set(min(value, 1e300))
            self.shift_threshold.labels(adapter).set(state.threshold)
            self.shift_alarm.labels(adapter).set(1.0 if state.alarm else 0.0)
            self.shift_observed.labels(adapter).set(state.observed)
            if state.accuracy_estimate is not None:
                self.accuracy_estimate.labels(adapter).set(state.accuracy_estimate)

    def init_adapter(self, adapter: str) -> None:
        """Create the per-bin counters at 0, so increase() in PromQL sees every labelled prediction
        (a counter series that first appears already at 1 loses that first increment)."""
        for b in range(N_BINS):
            for c in (self.cal_n, self.cal_conf, self.cal_correct):
                c.labels(adapter, str(b))
        # Every per-adapter series a dashboard or rule names exists from the start (0 until something happens).
        for m in (
            self.gen_tokens,
            self.gen_prompt_tokens,
            self.gen_confidence,
            self.gen_epistemic,
            self.gen_ttft,
            self.gen_tpot,
            self.unfamiliarity,
            self.unfamiliar,
        ):
            m.labels(adapter)
        self.gen_requests.labels(adapter, "ok")
        self.gen_abstentions.labels(adapter, "low_confidence")
        self.abstentions.labels(adapter, "low_confidence")

    def init_shift(self, adapter: str, state: object) -> None:
        """An adapter's shift monitor at the start of its test (statistic 1, no alarm)."""
        self.shift_statistic.labels(adapter).set(state.statistic)
        for name, value in state.components:
            self.shift_component.labels(adapter, name).set(value)
        self.shift_threshold.labels(adapter).set(state.threshold)
        self.shift_alarm.labels(adapter).set(0.0)
        self.shift_observed.labels(adapter).set(0)
        self.accuracy_estimate.labels(adapter)

    def observe_batch(self, requests: int, rows: int, seconds: float) -> None:
        self.backend_calls.inc()
        self.backend_seconds.inc(seconds)
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def observe_feedback(self, adapter: str, confidence: float, correct: bool) -> None:
        b = str(confidence_bin(confidence, N_BINS))
        self.cal_n.labels(adapter, b).inc()
        self.cal_conf.labels(adapter, b).inc(confidence)
        self.cal_correct.labels(adapter, b).inc(1.0 if correct else 0.0)
