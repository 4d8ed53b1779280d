"""Prometheus metrics of one server (its own registry, so several servers can share a process).

Names follow ``spkserve_<scope>_<what>``; the endpoint is a plain HTTP ``/metrics``.
"""

from __future__ import annotations

import platform

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from service import package_version

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_SPEECH_BUCKETS = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0, 300.0)
_SPEAKER_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 64)
_LLR_BUCKETS = (-20.0, -10.0, -5.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)


class Metrics:
    """All metric objects of a server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # process_*, python_* (CPU, memory, fds, GC)
            r.register(collector)
        self.requests = Counter("spkserve_grpc_requests_total",
                                "Requests by RPC and gRPC status code (HTTP/JSON calls counted under their RPC too)",
                                ["method", "code"], registry=r)
        self.latency = Histogram("spkserve_grpc_request_duration_seconds", "Request latency by RPC (gRPC and HTTP)",
                                 ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.http_requests = Counter("spkserve_http_requests_total", "HTTP/JSON API requests by route and HTTP status",
                                     ["route", "status"], registry=r)
        self.http_latency = Histogram("spkserve_http_request_duration_seconds", "HTTP/JSON API request latency",
                                      ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("spkserve_batch_size", "Utterances per inference batch",
                                    ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.queue_time = Histogram("spkserve_batch_queue_duration_seconds", "Time an utterance waited for its batch",
                                    ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_time = Histogram("spkserve_batch_inference_duration_seconds", "Model run time of a batch",
                                        ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("spkserve_batch_queue_depth", "Utterances waiting for a batch", ["model"], registry=r)
        self.dropped = Counter("spkserve_batch_dropped_total", "Utterances dropped before inference",
                               ["model", "reason"], registry=r)
        self.wasted = Counter("spkserve_batch_wasted_total",
                              "Utterances embedded after their caller had gone or their deadline had passed",
                              ["model"], registry=r)
        self.audio_seconds = Counter("spkserve_audio_seconds_total", "Seconds of audio embedded", ["model"], registry=r)
        self.speakers = Gauge("spkserve_index_speakers",
                              "Enrolled speakers per collection ('_all' unless collection labels are on)",
                              ["collection"], registry=r)
        self.store_writable = Gauge("spkserve_store_writable", "1 while the speaker store accepts writes", registry=r)
        self.store_errors = Counter("spkserve_store_errors_total", "Failed store operations: write, snapshot",
                                    ["operation"], registry=r)
        self.retention_deleted = Counter("spkserve_retention_deleted_total",
                                         "Speakers deleted by retention (unused too long)", registry=r)
        self.token_reloads = Counter("spkserve_token_reloads_total",
                                     "Reloads of auth_tokens_file on SIGHUP by result (ok, error: old tokens kept)",
                                     ["result"], registry=r)
        self.model_info = Gauge("spkserve_model_info", "Loaded models (value 1) with version and execution provider",
                                ["model", "version", "provider", "embedding_dim", "variant"], registry=r)
        self.ready = Gauge("spkserve_ready", "1 when the server is serving", registry=r)
        Gauge("spkserve_build_info", "The running spkserve (value 1): its version and Python",
              ["version", "python"], registry=r).labels(package_version(), platform.python_version()).set(1)
        self.speech_seconds = Histogram("spkserve_speech_seconds", "Net speech found by VAD per audio input",
                                        ["model", "method"], buckets=_SPEECH_BUCKETS, registry=r)
        self.speech_insufficient = Counter(
            "spkserve_speech_insufficient_total",
            "Inputs refused for their speech: no_speech, too_little_speech, speaker_not_ready",
            ["model", "method", "reason"], registry=r)
        self.multiple_speakers = Counter("spkserve_multiple_speakers_total",
                                         "Audio inputs whose parts did not match each other (a second talker)",
                                         ["model", "method"], registry=r)
        self.band_matched = Counter("spkserve_band_matched_total",
                                    "Pairs with a narrowband recording scored in its band: Verify of two recordings "
                                    "(each wider side embedded again in the narrowest band), or a wideband voiceprint "
                                    "carried into the recording's band by the model's band map (Verify, VerifyStream)",
                                    ["model"], registry=r)
        self.narrowband = Counter("spkserve_narrowband_inputs_total", "Audio inputs without energy above 4 kHz",
                                  ["model", "method"], registry=r)
        self.verdicts = Counter("spkserve_verdicts_total", "Verify/Identify verdicts", ["model", "method", "verdict"],
                                registry=r)
        self.diarization_audio = Counter("spkserve_diarization_audio_seconds_total",
                                         "Seconds of audio diarized", ["model"], registry=r)
        self.diarization_speakers = Histogram("spkserve_diarization_speakers", "Speakers found per diarized recording",
                                              ["model"], buckets=_SPEAKER_BUCKETS, registry=r)
        self.live_streams = Gauge("spkserve_live_streams", "VerifyStream calls in progress", ["model"], registry=r)
        self.live_speaker_changes = Counter("spkserve_live_speaker_changes_total",
                                            "Speaker changes flagged in live streams", ["model"], registry=r)
        self.decision_llr = Histogram("spkserve_decision_llr", "Calibrated scores (log-likelihood ratios) by verdict",
                                      ["model", "method", "verdict"], buckets=_LLR_BUCKETS, registry=r)
