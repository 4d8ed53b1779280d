"""The model RPCs of the servicer: describe, load, reload and unload models while serving."""

from __future__ import annotations

import re

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.convert import SCALE_PB
from service.errors import InvalidArgument
from service.rpc import rpc as _rpc

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
            min_probe_speech_seconds=policy.min_probe_speech, min_enroll_speech_seconds=policy.min_enroll_speech)

    @_rpc
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(m) for _, m in sorted(self.engine.models.items())],
                                     default_model=self.engine.default_model)

    @_rpc
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        return self._model_info(self.engine.model(request.name, "name"))

    @_rpc
    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        """Load a repository entry, or reload it (new version) while the old one keeps serving until the swap."""
        self._allow(context, "admin")
        if not _MODEL_NAME.fullmatch(request.model):
            raise InvalidArgument("model", f"{request.model[:64]!r} is not a repository entry name")
        model, previous = await self.engine.load_model(request.model)
        await self.on_models_changed()
        return pb.LoadModelResponse(model=self._model_info(model), replaced=previous is not None,
                                    previous_version=previous or "")

    @_rpc
    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        """Stop serving a model: queued work finishes, new requests for it answer NOT_FOUND."""
        self._allow(context, "admin")
        model = await self.engine.unload_model(request.model)
        await self.on_models_changed()
        return pb.UnloadModelResponse(model=model.name, version=model.card.version)
