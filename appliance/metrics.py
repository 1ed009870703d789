"""Prometheus metrics of the appliance (served at GET /metrics)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from models.bundle import expired as bundle_expired
from models.platform import platform_record

REGISTRY = CollectorRegistry()
FRAMES = Counter("linejudge_frames_total", "Frames judged", registry=REGISTRY)
FLAGS = Counter("linejudge_flags_total", "Inspections flagged for an operator", ["reason"], registry=REGISTRY)
LATENCY = Histogram("linejudge_latency_seconds", "Judge latency per frame", registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1, 2))
DROPPED = Gauge("linejudge_dropped_frames", "Camera frames dropped because scoring lagged", registry=REGISTRY)
QUEUE = Gauge("linejudge_review_queue_depth", "Flagged inspections awaiting review", registry=REGISTRY)
OUTBOX = Gauge("linejudge_outbox_unsent", "Outbox rows not yet sent to HQ", registry=REGISTRY)
MODEL_VERSION = Gauge("linejudge_model_version", "Version of the active model bundle", registry=REGISTRY)
GOLDEN_DELTA = Gauge("linejudge_golden_worst_reward_delta", "Largest golden-set reward delta of the graphs "
                     "in use", registry=REGISTRY)
GOLDEN_FALLBACK = Gauge("linejudge_golden_fp32_fallback", "1 when the INT8 graphs failed the golden-set "
                        "check and the fp32 graphs judge instead", registry=REGISTRY)
PLATFORM = Info("linejudge_platform", "Where the appliance runs: CPU, ISA flags, onnxruntime, provider, "
                "precision", registry=REGISTRY)
BUNDLE_EXPIRED = Gauge("linejudge_bundle_expired", "1 while the running bundle is past its expiry date (it "
                       "keeps inspecting until HQ sends a newer one)", registry=REGISTRY)
ERRORS = Counter("linejudge_inspection_errors_total", "Frames that failed to be judged", registry=REGISTRY)


def model_loaded(runtime) -> None:
    """The model gauges and the platform record, for the runtime now judging."""
    MODEL_VERSION.set(runtime.version)
    golden = runtime.golden
    GOLDEN_DELTA.set(golden.worst_delta if golden else float("nan"))
    GOLDEN_FALLBACK.set(1 if golden and golden.fallback else 0)
    manifest = runtime.manifest
    BUNDLE_EXPIRED.set_function(lambda: float(bundle_expired(manifest)))
    record = platform_record(runtime.provider)
    PLATFORM.info({**{k: str(v) for k, v in record.items() if k != "isa"}, "isa": " ".join(record["isa"]),
                   "precision": runtime.precision})


def observe(judgement) -> None:
    FRAMES.inc()
    LATENCY.observe(judgement.latency_ms / 1000)
    for reason in judgement.decision.reasons:
        FLAGS.labels(reason.split(":")[0]).inc()


def render(stats: dict | None = None) -> bytes:
    if stats:
        QUEUE.set(stats.get("review_queue", 0))
        OUTBOX.set(stats.get("outbox_unsent", 0))
    return generate_latest(REGISTRY)
