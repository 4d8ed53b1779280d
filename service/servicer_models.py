"""The model RPCs of the servicer: describe, load, reload and unload models while serving."""

from __future__ import annotations

import re

import numpy as np

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.convert import SCALE_PB, to_pcm16
from service.auth import PermissionDenied
from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.rpc import call_deadline
from service.rpc import rpc as _rpc
from service.store import validate_collection

__all__ = ["ModelRpcs"]

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ModelRpcs:
    """Mixin of ``SpeakerServicer`` (uses its ``engine``, ``_allow`` and ``on_models_changed``)."""

    def _model_info(self, model) -> pb.ModelInfo:
        c, policy, scorer = model.card, self.engine.policies[model.name], model.scorer
        return pb.ModelInfo(
            name=c.name, version=c.version, embedding_dim=c.embedding_dim, sample_rate=c.sample_rate,
            execution_provider=model.provider, threshold=c.threshold, min_audio_seconds=c.min_audio_seconds,
            max_audio_seconds=self.engine.config.max_audio_seconds, description=c.description, license=c.license,
            source=c.source, parameters=c.parameters, opset=c.opset, is_default=c.name == self.engine.default_model,
            cohort_size=0 if scorer.cohort is None else len(scorer.cohort), calibrated=scorer.calibration is not None,
            decision_scale=SCALE_PB[policy.scale], decision_threshold=policy.threshold, vad=policy.vad is not None,
            min_probe_speech_seconds=policy.min_probe_speech, min_enroll_speech_seconds=policy.min_enroll_speech,
            false_accept_table=[pb.FalseAcceptPoint(false_accept_rate=r, llr_threshold=t) for r, t in scorer.far_table],
            cohort_groups=scorer.group_names if scorer.groups is not None else [],
            input_level_dbfs=c.input_level_dbfs,
            input_tilt=pb.InputTilt(min_db_per_octave=c.input_tilt["min_db_per_octave"],
                                    max_db_per_octave=c.input_tilt["max_db_per_octave"]) if c.input_tilt else None,
            remove_mains_hum=c.remove_mains_hum, band_map=scorer.band_map is not None)

    @_rpc
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        """The models this server serves; see the proto."""
        return pb.ListModelsResponse(models=[self._model_info(m) for _, m in sorted(self.engine.models.items())],
                                     default_model=self.engine.default_model)

    @_rpc
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        """One served model (the default when none is named); see the proto."""
        return self._model_info(self.engine.model(request.name, "name"))

    def _model_control(self, context, method: str) -> None:
        """Model control is off unless ``model_control`` is set or the call carries an admin token."""
        if self.auth is None and not self.engine.config.model_control:
            raise PermissionDenied(f"model_control: {method} is off on this server (like Triton's model-control-mode "
                                   "none); set model_control = true (SPKSERVE_MODEL_CONTROL=true) or configure "
                                   "tokens and call with an admin token")
        self._allow(context, "admin")

    @_rpc
    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        """Load a repository entry, or reload it (new version) while the old one keeps serving until the swap."""
        self._model_control(context, "LoadModel")
        if not _MODEL_NAME.fullmatch(request.model):
            raise InvalidArgument("model", f"{request.model[:64]!r} is not a repository entry name")
        model, previous = await self.engine.load_model(request.model)
        await self.on_models_changed()
        return pb.LoadModelResponse(model=self._model_info(model), replaced=previous is not None,
                                    previous_version=previous or "")

    @_rpc
    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        """Stop serving a model: queued work finishes, new requests for it answer NOT_FOUND."""
        self._model_control(context, "UnloadModel")
        model = await self.engine.unload_model(request.model)
        await self.on_models_changed()
        return pb.UnloadModelResponse(model=model.name, version=model.card.version)

    @_rpc
    async def MigrateCollection(self, request: pb.MigrateCollectionRequest, context) -> pb.MigrateCollectionResponse:
        """Embed every speaker's retained enrollment speech with another model into a new collection."""
        from models.audio import resample

        self._model_control(context, "MigrateCollection")
        source = validate_collection(request.collection)
        target = validate_collection(request.target_collection, "target_collection")
        engine, store = self.engine, self.engine.store
        await engine.store_call(store.collection_binding, source)  # NotFound for an unknown source
        try:
            await engine.store_call(store.collection_binding, target)
            raise FailedPrecondition(f"target_collection: {target!r} exists; migrate into a new collection")
        except NotFound:
            pass
        model = engine.model(request.model)
        deadline = call_deadline(context)
        migrated, skipped, offset = 0, [], 0
        while True:
            page, total = await engine.store_call(store.list, source, offset, 100)
            for rec in page:
                chunks = await engine.store_call(store.retained_audio, source, rec.speaker_id)
                if not chunks:
                    skipped.append(rec.speaker_id)
                    continue
                waves = [resample(pcm.astype(np.float32) / 32767.0, rate, model.sample_rate) for rate, pcm in chunks]
                vectors = np.stack([(await engine.embed(model, w, deadline)).embedding for w in waves])  # (N, D)
                speech = sum(len(w) for w in waves) / model.sample_rate
                keep = [(model.sample_rate, to_pcm16(w)) for w in waves] if engine.config.retain_enrollment_audio else None
                await engine.store_call(store.enroll, target, model.name, rec.speaker_id, vectors, dict(rec.metadata),
                                        speech, False, model.card.version, keep)
                migrated += 1
            offset += len(page)
            if offset >= total or not page:
                break
        if skipped and not migrated:
            option = "on" if engine.config.retain_enrollment_audio else "off"
            raise FailedPrecondition(f"retain_enrollment_audio: none of the {len(skipped)} speakers of {source!r} has "
                                     f"retained enrollment speech (the option is {option} on this server; speakers "
                                     "enrolled while it was off cannot be migrated: enroll them again); nothing was written")
        await engine.report_collection(target)
        return pb.MigrateCollectionResponse(target_collection=target, model=model.name,
                                            model_version=model.card.version, migrated=migrated, skipped=skipped)

