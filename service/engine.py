"""The service's core without gRPC: models, their batchers, audio decoding, VAD and the speaker store.

``Engine`` is what the gRPC servicer adapts. It is usable on its own from asyncio code (tests,
notebooks) and keeps every blocking call off the event loop: decoding and voice activity
detection on a decode pool (live streams' chunks on a live pool of their own), inference on
each batcher's worker threads, speaker-store I/O on a single store thread (which also serialises
writes to the log).

Every audio input is prepared the same way (``prepare``): decode, downmix, resample to the
model's rate, find the speech with Silero VAD and keep only the speech segments. What is
embedded is that speech; ``Speech`` says how much there was.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from models.artifact import ArtifactError, scan_repository
from models.audio import AudioLimits, condition, decode_encoded, decode_pcm
from models.runtime import SpeakerModel, available_providers
from models.vad import SileroVad, keep_speech
from service.batcher import BatchResult, DynamicBatcher
from service.cohorts import CollectionCohorts
from service.config import ConfigError, ServerConfig
from service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from service.inputs import AudioInput, Speech
from service.store import IndexOptions, LocalStore, SpeakerStore, StoreUnavailable, load_key_file
from service.store.base import quoted
from service.metrics import Metrics
from service.model_setup import ModelPolicy, make_batcher, model_policy, select_models
from service.tracing import Tracing

__all__ = ["Engine", "AudioInput", "Speech", "ModelPolicy", "configured_key_files"]

log = logging.getLogger("spkserve.engine")


def gpu_available(providers: list[str]) -> bool:
    """Whether the first of ``providers`` this onnxruntime build offers is an accelerator (not the CPU)."""
    have = set(available_providers())
    first = next((p for p in providers if p in have), "CPUExecutionProvider")
    return first != "CPUExecutionProvider"


def configured_key_files(cfg: ServerConfig) -> list:
    """A configuration's key files, tenant patterns first (the first match wraps a collection's keys)."""
    try:
        keys = [load_key_file(path, pattern) for pattern, path in sorted(cfg.tenant_key_files.items())]
        if cfg.encryption_key_file:
            keys.append(load_key_file(cfg.encryption_key_file, "*"))
    except ValueError as e:
        raise ConfigError(f"option 'encryption_key_file'/'tenant_key_files': {e}") from None
    return keys


class Engine:
    """Models, batchers and the speaker store of one server.

    Args:
        config: server options.
        metrics: where to report.
    """

    def __init__(self, config: ServerConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.tracing = Tracing()  # started by the server when otlp_endpoint is set
        self.models: dict[str, SpeakerModel] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.store: SpeakerStore | None = None
        self.policies: dict[str, ModelPolicy] = {}
        self.vad: SileroVad | None = None
        self.default_model = config.default_model
        self.cohorts = CollectionCohorts(config.collection_cohort_min_speakers, config.collection_cohort_max_speakers,
                                         config.collection_cohort_refresh_seconds)
        self._decode_pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        # live streams' chunks (a few ms each, a caller waiting in real time) never queue behind a long
        # upload's decoding or a diarization's clustering on the pool above
        self._live_pool = ThreadPoolExecutor(config.live_decode_workers, thread_name_prefix="live")
        # the embedded store writes its log one call at a time; Milvus calls mostly wait on the server,
        # so many run at once (writes to one speaker still take turns inside the store)
        server = config.index_backend == "milvus" and "://" in config.milvus_uri  # not Milvus Lite's one file
        store_workers = config.store_workers or (16 if server else 1)
        self._store_pool = ThreadPoolExecutor(store_workers, thread_name_prefix="store")
        self._preparing = 0  # inputs on or waiting for the decode pool (admission)
        self._preparing_by_model: dict[str, int] = {}
        self._prepare_s: float | None = None  # moving average of one input's decode + VAD time
        self._admin_lock = asyncio.Lock()  # one model load/unload at a time

    # -- lifecycle --------------------------------------------------------------------
    async def load(self) -> None:
        """Open the store, load and warm up every model, start the batchers."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        opts = IndexOptions(index_type=cfg.index_type, hnsw_m=cfg.hnsw_m, hnsw_ef_search=cfg.hnsw_ef_search,
                            ivf_nlist=cfg.ivf_nlist, ivf_nprobe=cfg.ivf_nprobe,
                            hnsw_ef_construction=cfg.hnsw_ef_construction, ivf_pq_rerank=cfg.ivf_pq_rerank)
        self.store = await self._open_store(opts)
        dirs = await loop.run_in_executor(None, select_models, cfg)
        if cfg.vad or any(t.get("vad") for t in cfg.model_settings.values()):
            self.vad = await loop.run_in_executor(None, SileroVad)
        for d in dirs:
            self._install(*await self._open_model(d))
        if self.default_model not in self.models:
            raise ArtifactError(f"option 'default_model': {self.default_model!r} is not loaded (loaded: {sorted(self.models)})")
        await loop.run_in_executor(self._store_pool, self.store.set_stats_fn, self._voiceprint_stats)
        await self.report_collection("")

    async def _open_store(self, opts: IndexOptions) -> SpeakerStore:
        """The configured store; an unreachable Milvus is retried (health stays NOT_SERVING meanwhile)."""
        cfg, loop = self.config, asyncio.get_running_loop()
        if cfg.index_backend == "faiss":
            return await loop.run_in_executor(self._store_pool, lambda: LocalStore(
                cfg.data_dir, opts, cfg.fsync, cfg.snapshot_every, self._key_files()))
        from service.store.milvus import MilvusStore

        delay = 1.0
        while True:
            try:
                return await loop.run_in_executor(self._store_pool, lambda: MilvusStore(
                    cfg.milvus_uri, cfg.milvus_token, cfg.milvus_db, opts, self._key_files()))
            except StoreUnavailable as e:
                log.error("%s; retrying in %.0f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _open_model(self, model_dir) -> tuple[SpeakerModel, "ModelPolicy"]:
        """Load, warm up and check one repository entry (off the event loop); nothing is served yet."""
        cfg, loop = self.config, asyncio.get_running_loop()
        workers, threads = cfg.inference_threads(gpu_available(cfg.providers))
        model = await loop.run_in_executor(None, lambda: SpeakerModel(
            model_dir, cfg.providers, cfg.model_variant, threads, cfg.inter_op_threads, cfg.ort_spinning))
        if cfg.warmup:
            took = await loop.run_in_executor(None, model.warmup)
            log.info("warmed up %s v%s in %.3f s", model.name, model.card.version, took)
        log.info("model %s on %s: %d inference workers x %s ONNX Runtime threads", model.name, model.provider, workers,
                 threads or "default")
        policy = model_policy(self.config, model)
        if policy.vad is not None and self.vad is None:
            self.vad = await loop.run_in_executor(None, SileroVad)
        return model, policy

    def _install(self, model: SpeakerModel, policy: "ModelPolicy") -> None:
        """Start serving ``model`` (replacing one of the same name: new requests go to the new one)."""
        old = self.models.get(model.name)
        self.policies[model.name] = policy
        self.models[model.name] = model
        self.batchers[model.name] = make_batcher(self.config, self.metrics, model)
        if old is not None:
            self._retire_labels(old)
        self.metrics.model_info.labels(model.name, model.card.version, model.provider, str(model.dim),
                                       model.variant).set(1)
        if model.card.commercial_use is not True:
            log.warning("model %s: licence %r %s", model.name, model.card.license or "not declared",
                        "does not permit commercial use" if model.card.commercial_use is False
                        else "(commercial use not declared in model.json)")

    def _retire_labels(self, model: SpeakerModel) -> None:
        try:
            self.metrics.model_info.remove(model.name, model.card.version, model.provider, str(model.dim), model.variant)
        except KeyError:
            pass

    async def load_model(self, name: str) -> tuple[SpeakerModel, str | None]:
        """Load (or reload) repository entry ``name`` while serving; returns (model, replaced version or None).

        The old model keeps answering until the new one is loaded and warmed up; then new
        requests go to the new one and the old batcher finishes what it has queued.
        """
        async with self._admin_lock:
            dirs = {d.name: d for d in await asyncio.get_running_loop().run_in_executor(
                None, scan_repository, self.config.model_repository)}
            if name not in dirs:
                raise NotFound(f"model: {quoted(name)} is not in the model repository (has {sorted(dirs)})")
            old, old_batcher = self.models.get(name), self.batchers.get(name)
            model, policy = await self._open_model(dirs[name])
            self._install(model, policy)
            if old_batcher is not None:
                await old_batcher.close()
            log.info("model %s v%s %s", name, model.card.version,
                     f"replaced v{old.card.version}" if old is not None else "loaded")
            return model, None if old is None else old.card.version

    async def unload_model(self, name: str) -> SpeakerModel:
        """Stop serving ``name`` (not the default model); its queued work finishes first."""
        async with self._admin_lock:
            model = self.model(name)
            if model.name == self.default_model:
                raise FailedPrecondition(f"model: {name!r} is the default model (option 'default_model'); "
                                         "it cannot be unloaded")
            del self.models[model.name]
            self.policies.pop(model.name, None)
            batcher = self.batchers.pop(model.name)
            await batcher.close()
            self._retire_labels(model)
            log.info("model %s v%s unloaded", model.name, model.card.version)
            return model

    def _key_files(self) -> list:
        """The configured key files, tenant patterns first (the first match wraps a collection's keys)."""
        return configured_key_files(self.config)

    def _voiceprint_stats(self, model_name: str, voiceprints: np.ndarray) -> np.ndarray | None:
        """Cohort statistics (N, 3) of a collection's voiceprints, None when its model has no cohort."""
        model = self.models.get(model_name)
        return None if model is None else model.scorer.stats(voiceprints)

    async def close(self) -> None:
        """Finish queued work, stop batchers, snapshot and close the store."""
        for b in self.batchers.values():
            await b.close()
        if self.store is not None:
            await asyncio.get_running_loop().run_in_executor(self._store_pool, self.store.close)
        self._decode_pool.shutdown(wait=True)
        self._live_pool.shutdown(wait=True)
        self._store_pool.shutdown(wait=True)

    # -- models -----------------------------------------------------------------------
    def model(self, name: str, field: str = "model") -> SpeakerModel:
        """The named model ('' for the default). Raises NotFound."""
        name = name or self.default_model
        model = self.models.get(name)
        if model is None:
            if not self.models:
                raise Unavailable("models are still loading")
            raise NotFound(f"{field}: unknown model {quoted(name)}; loaded models are {sorted(self.models)}")
        return model

    @property
    def decode_pool(self) -> ThreadPoolExecutor:
        """The threads that decode and screen audio (blocking work, never on the event loop)."""
        return self._decode_pool

    @property
    def live_pool(self) -> ThreadPoolExecutor:
        """The threads that decode and run VAD on live streams' chunks (``VerifyStream``), apart from
        ``decode_pool`` so that a chunk never waits behind a long recording's work."""
        return self._live_pool

    def limits(self, model: SpeakerModel) -> AudioLimits:
        """Duration limits for ``model``'s inputs."""
        return AudioLimits(model.card.min_audio_seconds, self.config.max_audio_seconds)

    # -- audio ------------------------------------------------------------------------
    def _prepare_sync(self, model: SpeakerModel, audio: AudioInput) -> Speech:
        t0 = time.perf_counter()
        if audio.pcm_encoding is None:
            samples, sr = decode_encoded(audio.data, f"{audio.field}.encoded", self.limits(model))
        else:
            samples, sr = decode_pcm(audio.data, audio.sample_rate, audio.pcm_encoding, audio.channels,
                                     f"{audio.field}.pcm", self.limits(model))
        wave = condition(samples, sr, model.sample_rate, self.limits(model), audio.field)  # (T,)
        rate = model.sample_rate
        vad = self.policies[model.name].vad
        if vad is None or self.vad is None:
            return Speech(wave, len(wave) / rate, len(wave) / rate, [(0.0, len(wave) / rate)], False,
                          time.perf_counter() - t0)
        t_vad = time.perf_counter()
        segments, narrow = self.vad.analyse(wave, rate, vad)
        speech = keep_speech(wave, segments)  # (T',)
        done = time.perf_counter()
        return Speech(speech, len(speech) / rate, len(wave) / rate, [(a / rate, b / rate) for a, b in segments], True,
                      done - t0, narrow, vad_s=done - t_vad)

    async def prepare(self, model: SpeakerModel, audio: AudioInput, deadline: float | None = None) -> Speech:
        """Decode, downmix, resample, check and VAD one input on the decode pool.

        Admission comes first: when the work ahead (inputs being decoded, audio queued for the
        model) cannot be done before ``deadline`` or within ``max_queue_wait_ms``, the call is
        refused before it costs any decoding (Overloaded, with the estimated wait).
        """
        batcher = self.batchers.get(model.name)
        if batcher is None or self.models.get(model.name) is not model:
            raise Unavailable(f"model {model.name} was unloaded or replaced; retry")
        backlog = self._preparing / self.config.decode_workers * (self._prepare_s or 0.0)
        batcher.admit(deadline, pending=self._preparing_by_model.get(model.name, 0), extra_s=backlog)
        self._preparing += 1
        self._preparing_by_model[model.name] = self._preparing_by_model.get(model.name, 0) + 1
        try:
            speech = await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._prepare_sync, model, audio)
            if self.tracing.on:
                start = self.tracing.record("vad", speech.vad_s, speech_seconds=speech.speech_seconds)
                self.tracing.record("decode", speech.decode_s - speech.vad_s, end_ns=start, field=audio.field,
                                    audio_seconds=speech.audio_seconds)
            # the work itself (decode + VAD), not the wait for a decode thread: the backlog adds that
            self._prepare_s = speech.decode_s if self._prepare_s is None else 0.8 * self._prepare_s + 0.2 * speech.decode_s
            return speech
        finally:
            self._preparing -= 1
            self._preparing_by_model[model.name] -= 1

    async def embed(self, model: SpeakerModel, wave: np.ndarray, deadline: float | None = None,
                    admitted: bool = False, urgent: bool = False) -> BatchResult:
        """Embed one model-ready waveform through the model's batcher (``admitted``, ``urgent``: see
        ``DynamicBatcher.submit``)."""
        if self.models.get(model.name) is not model:
            raise Unavailable(f"model {model.name} v{model.card.version} was unloaded or replaced while this "
                              "request was being prepared; retry")
        result = await self.batchers[model.name].submit(wave, deadline, admitted, urgent)
        if self.tracing.on:
            start = self.tracing.record("inference", result.inference_s, model=model.name, batch_size=result.batch_size)
            self.tracing.record("queue", result.queue_s, end_ns=start, model=model.name)
        self.metrics.audio_seconds.labels(model.name).inc(len(wave) / model.sample_rate)
        return result

    # -- embeddings given by clients --------------------------------------------------
    @staticmethod
    def unit_embedding(values: Any, dim: int | None, field: str) -> np.ndarray:
        """Validate a client-given embedding and L2-normalise it to (D,) float32.

        The norm is taken in float64, where squares of any float32 value neither overflow
        (1e20) nor underflow (1e-30), so huge and tiny vectors keep their direction.
        """
        vec = np.asarray(values, dtype=np.float64)
        if vec.ndim != 1 or vec.size == 0:
            raise InvalidArgument(field, "is empty")
        if dim is not None and vec.shape[0] != dim:
            raise InvalidArgument(field, f"has {vec.shape[0]} values, the model's embedding size is {dim}")
        if not np.isfinite(vec).all():
            raise InvalidArgument(field, "contains NaN or inf")
        norm = float(np.linalg.norm(vec))
        if not norm > 0.0:
            raise InvalidArgument(field, "is the zero vector")
        unit = (vec / norm).astype(np.float32)
        if not np.isfinite(unit).all() or abs(float(np.linalg.norm(unit)) - 1.0) > 1e-3:
            raise InvalidArgument(field, "cannot be normalised to a unit vector")
        return unit

    # -- store ------------------------------------------------------------------------
    async def store_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking speaker-store call on the store thread."""
        if self.store is None:
            raise Unavailable("the speaker store is still opening")
        try:
            with self.tracing.span("store", operation=getattr(fn, "__name__", "call")):
                return await asyncio.get_running_loop().run_in_executor(self._store_pool, fn, *args)
        except StoreUnavailable:
            self.metrics.store_errors.labels("write").inc()
            raise

    async def report_collection(self, collection: str) -> None:
        """Refresh the speakers gauge: per collection when collection labels are on, else the total."""
        infos = await self.store_call(self.store.collections)
        if not self.config.metrics_collection_labels:
            self.metrics.speakers.labels("_all").set(sum(i.speaker_count for i in infos))
            return
        for info in infos:
            if not collection or info.name == collection:
                self.metrics.speakers.labels(info.name).set(info.speaker_count)
        if collection and collection not in {i.name for i in infos}:  # deleted: its series goes too
            try:
                self.metrics.speakers.remove(collection)
            except KeyError:  # never reported
                pass

    async def retention_loop(self) -> None:
        """Forever: persist last-use times and delete speakers unused for ``retention_days``."""
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.retention_check_seconds)
            try:
                await self.store_call(self.store.flush_touches)
                if cfg.retention_days > 0:
                    cutoff = int((time.time() - cfg.retention_days * 86400) * 1000)
                    n = await self.store_call(self.store.expire, cutoff)
                    if n:
                        self.metrics.retention_deleted.inc(n)
                        await self.report_collection("")
            except Unavailable as e:
                log.error("retention: %s; retried in %.0f s", e, cfg.retention_check_seconds)
