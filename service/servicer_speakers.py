"""The servicer's speaker-record RPCs: get, list, update, delete (and opt out) speakers, list and delete collections."""

from __future__ import annotations

import re

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.convert import speaker_pb
from service.errors import InvalidArgument
from service.rpc import rpc as _rpc
from service.store import quoted, validate_collection, validate_speaker_id
from service.store.base import validate_metadata_keys

__all__ = ["SpeakerRecordRpcs"]

_PAGE_TOKEN = re.compile(r"[1-9][0-9]{0,8}")  # what ListSpeakers issues: a positive offset
MAX_PAGE_BYTES = 2 << 20  # ListSpeakers pages stay under 2 MiB whatever their metadata


class SpeakerRecordRpcs:
    """Mixin of ``SpeakerServicer`` (uses its ``engine``, ``auth`` and ``_allow``)."""

    async def _speaker_ref(self, request, context, permission: str) -> tuple[str, str, str]:
        """Validated (collection, speaker_id) of a request and the collection's model (NotFound if none)."""
        coll = validate_collection(request.collection)
        spk = validate_speaker_id(request.speaker_id)
        self._allow(context, permission, coll)
        return coll, spk, await self.engine.store_call(self.engine.store.collection_model, coll)

    def _required(self, model_name: str) -> float:
        policy = self.engine.policies.get(model_name)
        return policy.min_enroll_speech if policy else self.engine.config.min_enroll_speech_seconds

    @_rpc
    async def DeleteSpeaker(self, request: pb.DeleteSpeakerRequest, context) -> pb.DeleteSpeakerResponse:
        """Delete a speaker (and with opt_out refuse its id later); see the proto."""
        if request.opt_out:
            coll, spk = validate_collection(request.collection), validate_speaker_id(request.speaker_id)
            self._allow(context, "write", coll)
        else:
            coll, spk, _ = await self._speaker_ref(request, context, "write")
        rec = await self.engine.store_call(self.engine.store.delete, coll, spk, request.opt_out)
        self.engine.cohorts.invalidate(coll)
        await self.engine.report_collection(coll)
        if rec is None:
            return pb.DeleteSpeakerResponse()
        model = await self.engine.store_call(self.engine.store.collection_model, coll)
        return pb.DeleteSpeakerResponse(speaker=speaker_pb(coll, model, rec, self._required(model)))

    @_rpc
    async def UpdateSpeaker(self, request: pb.UpdateSpeakerRequest, context) -> pb.UpdateSpeakerResponse:
        """Change a speaker's metadata (set keys, then remove keys); see the proto."""
        coll, spk, model = await self._speaker_ref(request, context, "write")
        remove = validate_metadata_keys(list(request.remove_metadata_keys))
        if not request.metadata and not remove:
            raise InvalidArgument("metadata", "nothing to change: set metadata or remove_metadata_keys")
        for i, key in enumerate(remove):
            if key in request.metadata:
                raise InvalidArgument(f"remove_metadata_keys[{i}]", f"{quoted(key)} is also set in metadata")
        rec = await self.engine.store_call(self.engine.store.update_metadata, coll, spk, dict(request.metadata),
                                           remove)
        return pb.UpdateSpeakerResponse(speaker=speaker_pb(coll, model, rec, self._required(model)))

    @_rpc
    async def GetSpeaker(self, request: pb.GetSpeakerRequest, context) -> pb.Speaker:
        """One enrolled speaker's record; see the proto."""
        coll, spk, model = await self._speaker_ref(request, context, "read")
        rec = await self.engine.store_call(self.engine.store.get, coll, spk)
        return speaker_pb(coll, model, rec, self._required(model), request.include_voiceprint)

    @_rpc
    async def ListSpeakers(self, request: pb.ListSpeakersRequest, context) -> pb.ListSpeakersResponse:
        """A page of a collection's speakers; see the proto."""
        coll = validate_collection(request.collection)
        self._allow(context, "read", coll)
        if not 0 <= request.page_size <= 1000:
            raise InvalidArgument("page_size", f"must be in 0..1000, got {request.page_size}")
        size = request.page_size or 100
        token = request.page_token
        if token and not _PAGE_TOKEN.fullmatch(token):
            raise InvalidArgument("page_token", f"{quoted(token)} is not a token this server issued")
        offset = int(token) if token else 0
        store = self.engine.store
        model = await self.engine.store_call(store.collection_model, coll)
        page, total = await self.engine.store_call(store.list, coll, offset, size)
        required = self._required(model)
        speakers, used = [], 0
        for r in page:  # a page also ends before MAX_PAGE_BYTES, under clients' 4 MiB default message limit
            msg = speaker_pb(coll, model, r, required)
            used += msg.ByteSize() + 8
            if speakers and used > MAX_PAGE_BYTES:
                break
            speakers.append(msg)
        end = offset + len(speakers)
        nxt = str(end) if end < total else ""
        return pb.ListSpeakersResponse(speakers=speakers, next_page_token=nxt, total_size=total)

    @_rpc
    async def ListCollections(self, request: pb.ListCollectionsRequest, context) -> pb.ListCollectionsResponse:
        """The collections the caller's token can see; see the proto."""
        self._allow(context, "read")
        infos = await self.engine.store_call(self.engine.store.collections)
        if self.auth is not None:
            token = self.auth.token_of(context.invocation_metadata())
            infos = [i for i in infos if token.covers(i.name)]
        return pb.ListCollectionsResponse(collections=[_collection_pb(i) for i in infos])

    @_rpc
    async def DeleteCollection(self, request: pb.DeleteCollectionRequest, context) -> pb.DeleteCollectionResponse:
        """Delete a collection with its speakers (``force``) and its model binding; see the proto."""
        coll = validate_collection(request.collection)
        self._allow(context, "write", coll)
        info = await self.engine.store_call(self.engine.store.drop_collection, coll, request.force)
        self.engine.cohorts.invalidate(coll)
        await self.engine.report_collection(coll)
        return pb.DeleteCollectionResponse(collection=_collection_pb(info))


def _collection_pb(info) -> pb.Collection:
    """A store's ``CollectionInfo`` as the API's ``Collection``."""
    return pb.Collection(name=info.name, model=info.model, embedding_dim=info.dim, speaker_count=info.speaker_count,
                         index_type=info.index_type, model_version=info.model_version)
