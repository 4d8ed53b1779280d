"""Server configuration: defaults < TOML file < environment (SPKSERVE_*) < command line.

Every option is a field of ``ServerConfig``; the environment variable of a field is its name
upper-cased with the ``SPKSERVE_`` prefix (``SPKSERVE_MAX_BATCH_SIZE=32``); list fields take
comma-separated values. The resolved configuration is logged once at start-up (secrets
masked).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

__all__ = ["ServerConfig", "ConfigError", "load_config", "default_model_repository", "MODEL_SETTING_KEYS",
           "unknown_environment", "OTHER_ENVIRONMENT"]

#: ``SPKSERVE_*`` variables that are not server options: the command line's, the model puller's and the scripts'.
OTHER_ENVIRONMENT = frozenset({"SPKSERVE_CONFIG", "SPKSERVE_TARGET", "SPKSERVE_TOKEN", "SPKSERVE_CACHE",
                               "SPKSERVE_REQUIRE_PYTHONS"})

# Options that [model_settings.<model>] tables may set for one model (they override the
# server-wide option of the same name for that model only).
MODEL_SETTING_KEYS = ("vad", "vad_threshold", "vad_min_speech_ms", "vad_min_silence_ms", "vad_speech_pad_ms",
                      "min_probe_speech_seconds", "min_enroll_speech_seconds", "decision_scale", "decision_threshold")
_SCALES = ("", "cosine", "normalized", "llr")

_INDEX_TYPES = ("flat", "hnsw", "ivf", "ivf_pq")
_VARIANTS = ("fp32", "int8")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """An option with a bad value; the message names the option and the value."""


def default_model_repository() -> str:
    """The repository shipped with the project (``models/repository``)."""
    import models

    return str(Path(models.__file__).resolve().parent / "repository")


@dataclass
class ServerConfig:
    """All server options. Sizes are per model unless said otherwise."""

    host: str = "0.0.0.0"  # address of the gRPC (and, unless http_host says otherwise, HTTP) listener
    port: int = 50051  # gRPC (0 picks a free port)
    metrics_port: int = 9090  # 0 picks a free port, -1 disables the metrics endpoint
    http_port: int = 8080  # the HTTP/JSON API and web console (same tokens, limits, TLS); 0 turns it off
    http_host: str = ""  # empty: the same address as host
    metrics_host: str = "127.0.0.1"  # the metrics endpoint has no authentication: local only unless set
    metrics_collection_labels: bool = False  # per-collection series (collection names are visible to scrapers)
    model_repository: str = field(default_factory=default_model_repository)  # one directory per model (model.onnx + model.json)
    models: list[str] = field(default_factory=list)  # empty: every model in the repository
    default_model: str = "ge2e"  # the model of requests that name none
    model_variant: str = "fp32"  # which file of each model: fp32 or int8
    data_dir: str = "data"  # speakers (index, write-ahead log, keys) of the embedded store
    # ONNX Runtime
    # execution providers in order of preference (missing ones are skipped)
    providers: list[str] = field(default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    intra_op_threads: int = 0  # 0: auto (CPU: cores / inference_workers; GPU: ONNX Runtime's default)
    inter_op_threads: int = 1  # ONNX Runtime threads across graph nodes
    ort_spinning: bool = False  # idle ORT threads spin-wait; off leaves CPU to request handling
    warmup: bool = True  # run each model once per batch shape class before SERVING
    # dynamic batching
    max_batch_size: int = 32  # utterances in one inference batch
    max_batch_seconds: float = 320.0  # padded audio seconds in one batch
    max_wait_ms: float = 0.0  # with one worker, batches fill while the previous one runs; waiting adds latency
    max_queue: int = 512  # waiting utterances before RESOURCE_EXHAUSTED
    batch_min_fill: float = 0.9  # least share of a batch's padded samples that is real audio (length bucketing)
    max_queue_wait_ms: float = 2000.0  # refuse at once when the estimated queueing time is longer (0: no limit)
    inference_workers: int = 0  # batches that run concurrently per model; 0: auto (CPU: min(cores, 4); GPU: 1)
    # requests
    deadline_margin: float = 0.3  # share of a call's remaining time kept free of estimated work at admission
    max_audio_seconds: float = 300.0  # longest audio of one input (EmbedStream: max_stream_audio_seconds)
    max_message_mb: int = 16  # one unary request; longer audio goes through EmbedStream
    max_inflight_request_mb: int = 256  # request bytes held by all calls in progress, process-wide
    max_stream_mb: int = 256  # bytes of one EmbedStream/DiarizeStream upload
    max_stream_audio_seconds: float = 3600.0  # EmbedStream: longer than max_audio_seconds is embedded window by window
    max_stream_messages: int = 100_000  # messages of one EmbedStream (config + chunks)
    max_diarize_audio_seconds: float = 900.0  # unary Diarize (decoded in blocks; DiarizeStream: max_stream_audio_seconds)
    store_workers: int = 0  # threads calling the speaker store; 0: auto (a Milvus server: 16; else 1)
    decode_workers: int = 2  # threads decoding, resampling and running VAD
    live_decode_workers: int = 2  # threads decoding and running VAD on live streams' chunks (apart from the rest)
    # voice activity detection (Silero VAD) before every embedding; the model's model.json
    # may carry its own VAD options, and [model_settings.<model>] overrides both
    vad: bool = True  # embed only the speech Silero VAD finds
    vad_threshold: float = 0.5  # speech probability above which a frame is speech
    vad_min_speech_ms: float = 250.0  # shorter speech bursts are dropped
    vad_min_silence_ms: float = 100.0  # shorter pauses do not split speech
    vad_speech_pad_ms: float = 30.0  # kept around each speech segment
    # net-speech rules
    min_probe_speech_seconds: float = 1.0  # per audio probe of Verify/Identify, else VERDICT_NOT_ENOUGH_SPEECH
    min_enroll_speech_seconds: float = 3.0  # per speaker, in total, to be READY
    allow_unready_speakers: bool = False  # may Verify/Identify use speakers below min_enroll_speech_seconds
    # one-talker check of Verify/Identify/Enroll audio: parts of the speech scored against each other
    speaker_check: bool = True  # flag inputs whose parts sound like different speakers
    speaker_check_min_seconds: float = 4.0  # only inputs with at least this much speech are checked
    speaker_check_llr: float = -2.0  # two parts scoring below this calibrated LLR: multiple speakers
    # a narrowband recording against a wider one (models.band_match) or a wideband voiceprint (models.band_map)
    band_match: bool = True  # re-embed the wider recording in the narrow band; map a voiceprint into it
    # live verification (VerifyStream)
    stream_idle_timeout_seconds: float = 30.0  # a stream (live, or an upload) that sends nothing this long is ended
    live_change_window_seconds: float = 2.0  # recent speech scored against the earlier for a speaker change
    live_change_min_base_seconds: float = 3.0  # earlier speech needed before a change can be flagged
    live_change_llr: float = 0.0  # recent vs earlier speech below this calibrated LLR: speaker changed ...
    live_change_reference_llr: float = 0.0  # ... and recent speech vs the reference below this (50: no condition)
    live_final_margin: float = 0.1  # final result: re-embed the whole speech when within this cosine of the threshold
    live_priority_ms: float = 250.0  # live windows go ahead of older queued work for up to this long (0: arrival order)
    # while live windows arrive, the last free inference worker starts no batch estimated longer than this (0: off)
    live_reserve_ms: float = 100.0
    # a collection of at least this many speakers normalises scores against its own voiceprints (0: off)
    collection_cohort_min_speakers: int = 0
    collection_cohort_max_speakers: int = 5000  # voiceprints of a collection cohort, at most
    collection_cohort_refresh_seconds: float = 60.0  # re-read it after this long (other replicas' changes)
    # decisions: empty scale = the model's operating point (model.json)
    decision_scale: str = ""  # cosine | normalized | llr: the scale of decision_threshold
    decision_threshold: float = 0.0  # on decision_scale, replacing the model's operating point
    model_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> {option: value}
    # speaker index
    index_backend: str = "faiss"  # faiss: embedded FAISS + write-ahead log in data_dir; milvus: a shared Milvus
    milvus_uri: str = ""  # http://host:19530 (a server) or a local file path (Milvus Lite)
    milvus_token: str = ""  # user:password or an API key
    milvus_db: str = ""  # empty: Milvus' default database
    index_type: str = "flat"  # flat (exact) | hnsw | ivf | ivf_pq (IVF of 4-bit codes, re-ranked exactly), for new collections
    hnsw_m: int = 32  # HNSW graph degree
    hnsw_ef_search: int = 128  # HNSW search breadth (recall vs speed)
    hnsw_ef_construction: int = 0  # HNSW build breadth (graph quality vs build time); 0: faiss 40, Milvus 200
    ivf_nlist: int = 1024  # IVF cells
    ivf_nprobe: int = 32  # IVF cells searched per query
    ivf_pq_rerank: int = 64  # ivf_pq: candidates re-scored exactly per result wanted (recall vs speed)
    snapshot_every: int = 10000  # WAL records between snapshots
    fsync: bool = True  # every acknowledged write is on disk (off: faster, a crash may lose the last writes)
    # data protection
    encryption_key_file: str = ""  # wraps every speaker's key (encryption at rest); 64 hex chars, mode 0600
    tenant_key_files: dict[str, str] = field(default_factory=dict)  # collection pattern ('acme-*') -> key file
    retain_enrollment_audio: bool = False  # keep enrollment speech (encrypted per speaker) for MigrateCollection
    retention_days: float = 0.0  # > 0: delete speakers unused (no enroll/verify/identify match) this long
    retention_check_seconds: float = 3600.0  # how often retention_days is applied
    # security
    # collections a tenant (a token's collections; the whole server without tokens) may create
    max_collections_per_tenant: int = 1000
    # LoadModel / UnloadModel / MigrateCollection without an admin token (off: PERMISSION_DENIED)
    model_control: bool = False
    auth_token: str = ""  # non-empty: require "authorization: Bearer <token>" (an admin token)
    auth_tokens_file: str = ""  # TOML [[tokens]] with name, sha256, collections, permissions
    tls_cert: str = ""  # PEM certificate: gRPC and HTTP over TLS (with tls_key)
    tls_key: str = ""  # PEM private key of tls_cert
    # lifecycle
    # delay + grace stay under docker stop's default 10 s (and Kubernetes' 30 s) before SIGKILL
    grace_seconds: float = 8.0  # in-flight calls get this long to finish after shutdown starts
    shutdown_delay_seconds: float = 1.0  # NOT_SERVING but still answering, so balancers move away first
    log_level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR or CRITICAL
    log_format: str = "text"  # text | json (one object per line, access-log fields as keys)
    otlp_endpoint: str = ""  # OpenTelemetry traces to this OTLP/gRPC collector (e.g. http://otel:4317); empty: off
    access_log: bool = True  # one line per call on logger spkserve.access (no audio, speaker ids or collections)

    def validate(self) -> "ServerConfig":
        """Check ranges and choices; raise ConfigError naming the option."""

        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"option '{name}' = {getattr(self, name)!r}: {why}")

        need(0 <= self.port <= 65535, "port", "must be in 0..65535")
        need(-1 <= self.metrics_port <= 65535, "metrics_port", "must be in -1..65535")
        need(0 <= self.http_port <= 65535, "http_port", "must be in 0..65535 (0: no HTTP API)")
        need(self.log_format in ("text", "json"), "log_format", "must be 'text' or 'json'")
        need(str(self.log_level).upper() in _LOG_LEVELS, "log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
        need(self.http_port == 0 or self.http_port != self.port, "http_port", "must differ from port")
        need(self.model_variant in _VARIANTS, "model_variant", f"must be one of {_VARIANTS}")
        need(self.intra_op_threads >= 0, "intra_op_threads", "must be >= 0")
        need(self.inter_op_threads >= 1, "inter_op_threads", "must be >= 1")
        need(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        need(self.max_batch_seconds > 0, "max_batch_seconds", "must be > 0")
        need(self.max_wait_ms >= 0, "max_wait_ms", "must be >= 0")
        need(self.max_queue >= 1, "max_queue", "must be >= 1")
        need(0 <= self.batch_min_fill <= 1, "batch_min_fill", "must be in 0..1")
        need(self.max_queue_wait_ms >= 0, "max_queue_wait_ms", "must be >= 0 (0: no limit)")
        need(self.inference_workers >= 0, "inference_workers", "must be >= 0 (0: auto)")
        need(self.max_audio_seconds > 0, "max_audio_seconds", "must be > 0")
        need(0 <= self.deadline_margin < 1, "deadline_margin", "must be in [0, 1)")
        need(self.max_message_mb >= 1, "max_message_mb", "must be >= 1")
        need(self.max_inflight_request_mb >= self.max_message_mb, "max_inflight_request_mb",
             "must be >= max_message_mb (one request must fit)")
        need(self.max_stream_mb >= 1, "max_stream_mb", "must be >= 1")
        need(self.max_collections_per_tenant >= 1, "max_collections_per_tenant", "must be >= 1")
        need(self.max_stream_audio_seconds >= self.max_audio_seconds, "max_stream_audio_seconds",
             "must be >= max_audio_seconds")
        need(0 < self.max_diarize_audio_seconds <= self.max_stream_audio_seconds, "max_diarize_audio_seconds",
             "must be > 0 and <= max_stream_audio_seconds")
        need(self.max_stream_messages >= 2, "max_stream_messages", "must be >= 2 (a config and a chunk)")
        need(self.decode_workers >= 1, "decode_workers", "must be >= 1")
        need(1 <= self.live_decode_workers <= 64, "live_decode_workers", "must be in 1..64")
        need(0 <= self.store_workers <= 256, "store_workers", "must be in 0..256 (0: auto)")
        need(0 < self.vad_threshold < 1, "vad_threshold", "must be in (0, 1)")
        for name in ("vad_min_speech_ms", "vad_min_silence_ms", "vad_speech_pad_ms"):
            need(0 <= getattr(self, name) <= 60_000, name, "must be in 0..60000 ms")
        need(0 <= self.min_probe_speech_seconds <= 600, "min_probe_speech_seconds", "must be in 0..600")
        need(0 <= self.min_enroll_speech_seconds <= 3600, "min_enroll_speech_seconds", "must be in 0..3600")
        need(4.0 <= self.speaker_check_min_seconds <= 600, "speaker_check_min_seconds", "must be in 4..600")
        need(math.isfinite(self.speaker_check_llr) and -50 <= self.speaker_check_llr <= 50, "speaker_check_llr",
             "must be in -50..50")
        need(0 < self.stream_idle_timeout_seconds <= 3600, "stream_idle_timeout_seconds", "must be in (0, 3600]")
        need(0.5 <= self.live_change_window_seconds <= 60, "live_change_window_seconds", "must be in 0.5..60")
        need(0 <= self.live_change_min_base_seconds <= 600, "live_change_min_base_seconds", "must be in 0..600")
        need(math.isfinite(self.live_change_llr) and -50 <= self.live_change_llr <= 50, "live_change_llr",
             "must be in -50..50")
        need(math.isfinite(self.live_change_reference_llr) and -50 <= self.live_change_reference_llr <= 50,
             "live_change_reference_llr", "must be in -50..50")
        need(math.isfinite(self.live_priority_ms) and 0 <= self.live_priority_ms <= 10000, "live_priority_ms",
             "must be in 0..10000")
        need(math.isfinite(self.live_reserve_ms) and 0 <= self.live_reserve_ms <= 10000, "live_reserve_ms",
             "must be in 0..10000")
        need(0 <= self.live_final_margin <= 2, "live_final_margin", "must be in 0..2 (cosine; 2: always re-embed)")
        need(self.collection_cohort_min_speakers == 0 or self.collection_cohort_min_speakers >= 10,
             "collection_cohort_min_speakers", "must be 0 (off) or >= 10 (fewer voiceprints estimate no spread)")
        need(self.collection_cohort_max_speakers >= max(self.collection_cohort_min_speakers, 10),
             "collection_cohort_max_speakers", "must be >= collection_cohort_min_speakers and >= 10")
        need(0 < self.collection_cohort_refresh_seconds <= 86400 and math.isfinite(self.collection_cohort_refresh_seconds),
             "collection_cohort_refresh_seconds", "must be in (0, 86400]")
        need(self.decision_scale in _SCALES, "decision_scale", f"must be one of {_SCALES[1:]} or empty")
        need(math.isfinite(self.decision_threshold), "decision_threshold", "must be a finite number")
        self._validate_model_settings()
        need(self.index_type in _INDEX_TYPES, "index_type", f"must be one of {_INDEX_TYPES}")
        need(self.index_backend in ("faiss", "milvus"), "index_backend", "must be 'faiss' or 'milvus'")
        if self.index_backend == "milvus":
            need(bool(self.milvus_uri), "milvus_uri", "is needed with index_backend = 'milvus'")
            scheme = self.milvus_uri.split("://", 1)[0] if "://" in self.milvus_uri else ""
            need(scheme in ("", "http", "https", "tcp", "grpc"), "milvus_uri",
                 "must be http(s)://host:port (a Milvus server) or a file path (Milvus Lite)")
            need(not self.retain_enrollment_audio, "retain_enrollment_audio", "is not supported with index_backend = 'milvus'")
        need(self.hnsw_m >= 4, "hnsw_m", "must be >= 4")
        need(self.hnsw_ef_search >= 1, "hnsw_ef_search", "must be >= 1")
        need(self.hnsw_ef_construction == 0 or self.hnsw_ef_construction >= self.hnsw_m, "hnsw_ef_construction",
             "must be 0 (the backend's default) or >= hnsw_m")
        need(self.ivf_nlist >= 1, "ivf_nlist", "must be >= 1")
        need(self.ivf_nprobe >= 1, "ivf_nprobe", "must be >= 1")
        need(self.ivf_pq_rerank >= 1, "ivf_pq_rerank", "must be >= 1")
        need(self.snapshot_every >= 1, "snapshot_every", "must be >= 1")
        need(self.retention_days >= 0 and math.isfinite(self.retention_days), "retention_days", "must be >= 0")
        need(self.retention_check_seconds >= 1, "retention_check_seconds", "must be >= 1")
        need(isinstance(self.tenant_key_files, dict) and all(isinstance(v, str) for v in self.tenant_key_files.values()),
             "tenant_key_files", "must be a table of collection pattern -> key file path")
        need(bool(self.tls_cert) == bool(self.tls_key), "tls_cert", "tls_cert and tls_key go together")
        need(self.grace_seconds >= 0, "grace_seconds", "must be >= 0")
        need(self.shutdown_delay_seconds >= 0, "shutdown_delay_seconds", "must be >= 0")
        return self

    def _validate_model_settings(self) -> None:
        if not isinstance(self.model_settings, dict):
            raise ConfigError(f"option 'model_settings' must be a table of model -> {{option: value}}, got {self.model_settings!r}")
        types = {f.name: f.type for f in fields(ServerConfig)}
        for model, table in self.model_settings.items():
            if not isinstance(table, dict):
                raise ConfigError(f"option 'model_settings.{model}' must be a table, got {table!r}")
            unknown = sorted(set(table) - set(MODEL_SETTING_KEYS))
            if unknown:
                raise ConfigError(f"option 'model_settings.{model}': unknown key(s) {unknown}; allowed: {list(MODEL_SETTING_KEYS)}")
            # each value must be valid where the server-wide option would be
            merged = {k: _coerce(f"model_settings.{model}.{k}", types[k], v) for k, v in table.items()}
            table.update(merged)
            try:
                dataclasses.replace(self, model_settings={}, **merged).validate()
            except ConfigError as e:
                raise ConfigError(f"option 'model_settings.{model}': {e}") from None

    def for_model(self, model: str) -> "ServerConfig":
        """This configuration with ``[model_settings.<model>]`` applied."""
        table = self.model_settings.get(model)
        return dataclasses.replace(self, **table) if table else self

    def inference_threads(self, gpu: bool, cores: int | None = None) -> tuple[int, int]:
        """``(inference_workers, intra_op_threads)`` for one model, the automatic (0) settings resolved.

        On CPU the default is several single-threaded batches at once rather than one batch
        split across cores: VAD and decoding run beside inference, and an ONNX Runtime thread
        pool as wide as the machine then waits on whichever of its threads they displaced (on 2
        cores, 2 workers x 1 thread served more utterances/s than 1 x 2 with VAD on, for about 10% more
        latency on an idle server; BENCHMARKS.md section 15). A GPU runs one batch at a time.
        """
        if not cores:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = self.inference_workers or (1 if gpu else min(cores, 4))
        threads = self.intra_op_threads or (0 if gpu else max(1, cores // workers))
        return workers, threads

    def redacted(self) -> dict[str, Any]:
        """The options as a dict with secrets masked, for the start-up log."""
        d = dataclasses.asdict(self)
        for secret in ("auth_token", "milvus_token"):
            if d[secret]:
                d[secret] = "***"
        return d


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Convert a TOML/env/CLI value to the field's type, or raise ConfigError."""
    try:
        if kind in (bool, "bool"):
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError("not a boolean")
        if kind in (int, "int"):
            if isinstance(value, bool):
                raise ValueError("not an integer")
            return int(value)
        if kind in (float, "float"):
            if isinstance(value, bool):
                raise ValueError("not a number")
            return float(value)
        if isinstance(kind, str) and kind.startswith("dict"):
            if isinstance(value, str):
                value = json.loads(value)  # the environment form: a JSON object
            if not isinstance(value, dict):
                raise ValueError("not a table")
            return value
        if kind in ("list[str]",):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError("not a list of strings")
        return str(value)
    except ValueError as e:
        raise ConfigError(f"option '{name}' = {value!r}: {e}") from None


def _unknown(key: str, value: Any, options: Mapping[str, Any]) -> str:
    """The message for a key that names no option: the option it most resembles, or what a table means."""
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "every option is listed in docs/configuration.md"
    if isinstance(value, dict) and key != "model_settings":
        hint = (f"options are top-level keys, not in a [{key}] table" + (f"; {hint}" if close else ""))
    return f"unknown option '{key}' ({hint})"


def unknown_environment(env: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for ``SPKSERVE_*`` environment variables that name no option (``load_config`` ignores them, so a
    misspelt one would otherwise go unnoticed), each with the option it most resembles."""
    env = os.environ if env is None else env
    options = sorted(f.name.upper() for f in fields(ServerConfig))
    out = []
    for var in sorted(env):
        name = var.removeprefix("SPKSERVE_")
        if name != var and name not in options and var not in OTHER_ENVIRONMENT and not name.startswith("TEST_"):
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)  # compared without the common prefix
            out.append(f"environment variable {var} is not an option and is ignored"
                       + (f" (did you mean SPKSERVE_{close[0]}?)" if close else ""))
    return out


def load_config(
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Resolve the configuration from a TOML file, the environment and explicit overrides.

    Args:
        path: optional TOML file with top-level keys named like the fields.
        env: environment to read ``SPKSERVE_*`` from (default ``os.environ``).
        overrides: values that win over everything (command-line options); None values are
            ignored.
    """
    env = os.environ if env is None else env
    types = {f.name: f.type for f in fields(ServerConfig)}
    values: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config file {path}: {e}") from None
        for key, value in raw.items():
            if key not in types:
                raise ConfigError(f"config file {path}: {_unknown(key, value, types)}")
            values[key] = _coerce(key, types[key], value)
    for name, kind in types.items():
        var = f"SPKSERVE_{name.upper()}"
        if var in env:
            values[name] = _coerce(name, kind, env[var])
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in types:
            raise ConfigError(_unknown(name, value, types))
        values[name] = _coerce(name, types[name], value)
    return ServerConfig(**values).validate()
