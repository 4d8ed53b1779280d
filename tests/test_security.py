"""Tenants and hostile input at the gRPC boundary: scoped tokens, malformed messages, streamed
decompression bombs, opt-out, the metrics endpoint's exposure and the store's health entry."""

from __future__ import annotations

import hashlib
import io
import time
import urllib.request

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
from service.auth import load_tokens
from tests.conftest import ServerThread, make_config

TOKENS = {"acme-rw": ("acme-token", ["acme", "acme-*"], ["read", "write"]),
          "acme-ro": ("acme-reader", ["acme"], ["read"]),
          "globex": ("globex-token", ["globex"], ["read", "write"]),
          "ops": ("ops-token", [], ["admin"])}


def unit(seed: int, dim: int = 256) -> list[float]:
    v = np.random.default_rng(seed).normal(size=dim)
    return (v / np.linalg.norm(v)).tolist()


def write_tokens(path) -> None:
    lines = []
    for name, (token, colls, perms) in TOKENS.items():
        lines += ["[[tokens]]", f'name = "{name}"', f'sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"',
                  f"collections = {colls!r}".replace("'", '"'), f"permissions = {perms!r}".replace("'", '"'), ""]
    path.write_text("\n".join(lines))


@pytest.fixture(scope="module")
def tenant_server(model_repo, tmp_path_factory):
    d = tmp_path_factory.mktemp("tenants")
    write_tokens(d / "tokens.toml")
    srv = ServerThread(make_config(model_repo, d / "data", models=["ge2e"], auth_tokens_file=str(d / "tokens.toml")))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(tenant_server):
    ch = grpc.insecure_channel(tenant_server.target)
    yield ch
    ch.close()


def as_(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[token][0]}")]


def enroll(stub, who: str, coll: str, spk: str, seed: int = 0, **kw):
    return stub.Enroll(pb.EnrollRequest(collection=coll, speaker_id=spk, embeddings=[
        pb.Embedding(values=unit(seed), speech_seconds=5.0)], **kw), metadata=as_(who))


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_token_file_format_is_checked(tmp_path):
    write_tokens(tmp_path / "t.toml")
    tokens = load_tokens(tmp_path / "t.toml")
    assert [t.name for t in tokens] == list(TOKENS) and tokens[0].covers("acme-eu") and not tokens[0].covers("acmex")
    base = {"name": '"x"', "sha256": '"' + "a" * 64 + '"', "collections": '["c"]', "permissions": '["read"]'}
    bad = {("sha256", '"abc"'): "sha256", ("permissions", '["root"]'): "permissions", ("colour", '"red"'): "unknown key",
           ("collections", '["has space"]'): "collections"}
    for (key, value), words in bad.items():
        entry = {**base, key: value}
        (tmp_path / "b.toml").write_text("[[tokens]]\n" + "".join(f"{k} = {v}\n" for k, v in entry.items()))
        with pytest.raises(ValueError, match=words):
            load_tokens(tmp_path / "b.toml")


def test_tenants_cannot_touch_each_others_collections(channel):
    stub = pb_grpc.SpeakerServiceStub(channel)
    enroll(stub, "acme-rw", "acme", "alice", 1)
    enroll(stub, "acme-rw", "acme-eu", "bob", 2)
    enroll(stub, "globex", "globex", "carol", 3)
    probe = pb.Probe(embedding=pb.Embedding(values=unit(1)))
    attempts = {
        "GetSpeaker": lambda: stub.GetSpeaker(pb.GetSpeakerRequest(collection="acme", speaker_id="alice",
                                                                   include_voiceprint=True), metadata=as_("globex")),
        "ListSpeakers": lambda: stub.ListSpeakers(pb.ListSpeakersRequest(collection="acme"), metadata=as_("globex")),
        "Identify": lambda: stub.Identify(pb.IdentifyRequest(collection="acme", probe=probe), metadata=as_("globex")),
        "Verify": lambda: stub.Verify(pb.VerifyRequest(a=probe, b=pb.Probe(speaker=pb.SpeakerRef(
            collection="acme", speaker_id="alice"))), metadata=as_("globex")),
        "Enroll": lambda: enroll(stub, "globex", "acme", "mallory", 4),
        "DeleteSpeaker": lambda: stub.DeleteSpeaker(pb.DeleteSpeakerRequest(collection="acme", speaker_id="alice"),
                                                    metadata=as_("globex")),
        "Enroll (read-only token)": lambda: enroll(stub, "acme-ro", "acme", "eve", 5),
        "Delete (read-only token)": lambda: stub.DeleteSpeaker(
            pb.DeleteSpeakerRequest(collection="acme", speaker_id="alice"), metadata=as_("acme-ro")),
        "UpdateSpeaker": lambda: stub.UpdateSpeaker(pb.UpdateSpeakerRequest(
            collection="acme", speaker_id="alice", metadata={"x": "1"}), metadata=as_("globex")),
        "UpdateSpeaker (read-only token)": lambda: stub.UpdateSpeaker(pb.UpdateSpeakerRequest(
            collection="acme", speaker_id="alice", metadata={"x": "1"}), metadata=as_("acme-ro")),
        "DeleteCollection": lambda: stub.DeleteCollection(pb.DeleteCollectionRequest(collection="acme", force=True),
                                                          metadata=as_("globex")),
        "DeleteCollection (read-only token)": lambda: stub.DeleteCollection(
            pb.DeleteCollectionRequest(collection="acme", force=True), metadata=as_("acme-ro")),
        "DeleteCollection (unknown)": lambda: stub.DeleteCollection(pb.DeleteCollectionRequest(collection="nope"),
                                                                    metadata=as_("globex")),
        "unknown collection": lambda: stub.ListSpeakers(pb.ListSpeakersRequest(collection="nope"), metadata=as_("globex")),
    }
    for what, call in attempts.items():
        code, details = code_of(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (what, code, details)
        assert "collection" in details, (what, details)
    assert stub.GetSpeaker(pb.GetSpeakerRequest(collection="acme", speaker_id="alice"), metadata=as_("acme-ro")).speaker_id == "alice"
    assert stub.ListSpeakers(pb.ListSpeakersRequest(collection="acme"), metadata=as_("acme-ro")).total_size == 1


def test_list_collections_shows_only_the_callers(channel):
    stub = pb_grpc.SpeakerServiceStub(channel)
    enroll(stub, "acme-rw", "acme", "alice", 1)
    enroll(stub, "globex", "globex", "carol", 3)
    names = lambda who: sorted(c.name for c in stub.ListCollections(pb.ListCollectionsRequest(), metadata=as_(who)).collections)  # noqa: E731
    assert names("acme-rw") == ["acme", "acme-eu"] or names("acme-rw") == ["acme"]
    assert "globex" not in names("acme-rw") and names("globex") == ["globex"]
    assert {"acme", "globex"} <= set(names("ops"))  # admin sees all


def test_unknown_or_missing_token_is_unauthenticated(channel):
    stub = pb_grpc.SpeakerServiceStub(channel)
    for md in ([], [("authorization", "Bearer nope")], [("authorization", TOKENS["ops"][0])]):
        code, _ = code_of(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=md))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel)  # probes need no token
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="spkserve.store")).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_opt_out_and_reenroll(channel):
    stub = pb_grpc.SpeakerServiceStub(channel)
    r = stub.DeleteSpeaker(pb.DeleteSpeakerRequest(collection="acme", speaker_id="optout-1", opt_out=True),
                           metadata=as_("acme-rw"))
    assert not r.HasField("speaker")
    code, details = code_of(lambda: enroll(stub, "acme-rw", "acme", "optout-1", 7))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "allow_reenroll" in details
    assert enroll(stub, "acme-rw", "acme", "optout-1", 7, allow_reenroll=True).created


def test_malformed_protobuf_is_invalid_argument(channel):
    for method in ("Embed", "Enroll", "ListSpeakers"):
        call = channel.unary_unary(f"/spkserve.v1.SpeakerService/{method}", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        for junk in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12\xff\xff\xff\xff\x0f"):
            with pytest.raises(grpc.RpcError) as e:
                call(junk, metadata=as_("ops"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, junk, e.value.details())
            assert "request" in e.value.details() and "Error" not in e.value.details()


def test_streamed_decompression_bomb_is_refused_early(channel):
    stub = pb_grpc.SpeakerServiceStub(channel)
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", 16000, 8, format="FLAC") as f:  # 61 minutes of 8-channel silence
        block = np.zeros((160000, 8), np.float32)
        for _ in range(366):
            f.write(block)
    data = buf.getvalue()
    sent = []

    def messages():
        yield pb.EmbedStreamRequest(config=pb.StreamConfig())
        for i in range(0, len(data), 8192):
            sent.append(i)
            if len(sent) > 16:  # past the header: a client sending at line rate, not faster than a loaded server reads
                time.sleep(0.05)
            yield pb.EmbedStreamRequest(chunk=data[i:i + 8192])

    code, details = code_of(lambda: stub.EmbedStream(messages(), metadata=as_("ops")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "declares 3660.0 s" in details
    assert len(sent) * 8192 < len(data)  # refused before the whole stream was sent


def test_metrics_bind_to_localhost_and_hide_collections(tenant_server):
    srv = tenant_server.server
    assert srv.config.metrics_host == "127.0.0.1"
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics").read().decode()
    assert 'spkserve_index_speakers{collection="_all"}' in text and "acme" not in text
    assert "spkserve_store_writable 1.0" in text


def test_huge_and_tiny_embeddings_keep_their_direction(stub):
    """Values that overflow float32 when squared, and values that underflow, are valid vectors."""
    v = np.array(unit(11))
    for scale in (1e20, 1e-30):
        r = stub.Enroll(pb.EnrollRequest(collection="scales", speaker_id=f"s{scale:g}", embeddings=[
            pb.Embedding(values=(v * scale).tolist(), speech_seconds=5.0)]))
        got = stub.GetSpeaker(pb.GetSpeakerRequest(collection="scales", speaker_id=r.speaker.speaker_id,
                                                   include_voiceprint=True))
        assert got.utterance_count == 1 and np.dot(got.voiceprint, v) > 0.9999
    code, details = code_of(lambda: stub.Enroll(pb.EnrollRequest(collection="scales", speaker_id="inf", embeddings=[
        pb.Embedding(values=(v * 1e41).tolist(), speech_seconds=5.0)])))  # inf once sent as float32
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "embeddings[0].values" in details


@pytest.mark.parametrize("request_, field", [
    (pb.ListSpeakersRequest(collection="scales\n"), "collection"),
    (pb.ListSpeakersRequest(collection="scales", page_token=" 5"), "page_token"),
    (pb.ListSpeakersRequest(collection="scales", page_token="+3"), "page_token"),
    (pb.ListSpeakersRequest(collection="scales", page_token=str(2 ** 63)), "page_token"),
    (pb.ListSpeakersRequest(collection="scales", page_token="0"), "page_token"),
])
def test_names_and_page_tokens_are_matched_exactly(stub, request_, field):
    code, details = code_of(lambda: stub.ListSpeakers(request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field)


@pytest.mark.parametrize("speaker_id", [
    "admin\u202egnp.exe", "a\u200bb", " padded", "x\u2028y",
    "\u3164", "ab\u3164", "\u2800", "\u0301abc",  # Hangul filler, Braille blank, a lone combining mark
    "\uff41lice", "\U0001d41alice", "\ufb01le",  # fullwidth, mathematical bold, a ligature
    "p\u0430ypal", "\u03b1lpha-a",  # Latin mixed with a Cyrillic a, a Greek alpha with Latin
])
def test_invisible_and_control_characters_in_ids_are_refused(stub, speaker_id):
    code, details = code_of(lambda: stub.Enroll(pb.EnrollRequest(collection="scales", speaker_id=speaker_id, embeddings=[
        pb.Embedding(values=unit(1), speech_seconds=5.0)])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("speaker_id")


def test_speaker_ids_are_one_spelling(stub):
    """The composed and decomposed 'café' are one speaker; one script per id is fine in any script."""
    vec = pb.Embedding(values=unit(3), speech_seconds=5.0)
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    stub.Enroll(pb.EnrollRequest(collection="nfc", speaker_id=decomposed, embeddings=[vec]))
    r = stub.Enroll(pb.EnrollRequest(collection="nfc", speaker_id=composed, embeddings=[vec]))
    assert not r.created and r.speaker.speaker_id == composed and r.speaker.utterance_count == 2
    got = stub.GetSpeaker(pb.GetSpeakerRequest(collection="nfc", speaker_id=decomposed))
    assert got.speaker_id == composed
    for ok in ("\u0418\u0432\u0430\u043d-2", "\u674e\u5a1c", "o'brien.42"):  # Cyrillic, Han, Latin
        stub.Enroll(pb.EnrollRequest(collection="nfc", speaker_id=ok, embeddings=[vec]))


def test_long_names_are_not_echoed_back(stub):
    code, details = code_of(lambda: stub.GetSpeaker(pb.GetSpeakerRequest(collection="scales", speaker_id="z" * 250)))
    assert code == grpc.StatusCode.NOT_FOUND and len(details) < 200
    code, details = code_of(lambda: stub.Identify(pb.IdentifyRequest(
        collection="scales", probe=pb.Probe(embedding=pb.Embedding(values=unit(1))), min_score=float("nan"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "min_score" in details


def test_model_admin_needs_admin_permission(channel):
    stub = pb_grpc.SpeakerServiceStub(channel)
    code, details = code_of(lambda: stub.UnloadModel(pb.UnloadModelRequest(model="ge2e"), metadata=as_("acme-rw")))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
    code, _ = code_of(lambda: stub.UnloadModel(pb.UnloadModelRequest(model="ge2e"), metadata=as_("ops")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # admin passes the check; the default model stays


def test_collections_per_tenant_are_capped(model_repo, tmp_path):
    from tests.conftest import ServerThread, make_config

    srv = ServerThread(make_config(model_repo, tmp_path, models=["ge2e"], max_collections_per_tenant=2))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            enroll = lambda c, spk: s.Enroll(pb.EnrollRequest(collection=c, speaker_id=spk, embeddings=[  # noqa: E731
                pb.Embedding(values=unit(5), speech_seconds=5.0)]))
            enroll("one", "a")
            enroll("two", "a")
            enroll("two", "b")  # an existing collection: fine
            code, details = code_of(lambda: enroll("three", "a"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_collections_per_tenant (2)" in details
            assert {c.name for c in s.ListCollections(pb.ListCollectionsRequest()).collections} == {"one", "two"}
            s.DeleteCollection(pb.DeleteCollectionRequest(collection="one", force=True))  # frees its place
            enroll("three", "a")
            assert {c.name for c in s.ListCollections(pb.ListCollectionsRequest()).collections} == {"three", "two"}
    finally:
        srv.stop()


def test_list_speakers_pages_by_bytes_too(model_repo, tmp_path, monkeypatch):
    import service.servicer_speakers as speakers
    from tests.conftest import ServerThread, make_config

    monkeypatch.setattr(speakers, "MAX_PAGE_BYTES", 6000)
    srv = ServerThread(make_config(model_repo, tmp_path, models=["ge2e"]))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            for i in range(10):
                s.Enroll(pb.EnrollRequest(collection="big", speaker_id=f"s{i}", metadata={"note": "x" * 1000, "more": "y" * 500},
                                          embeddings=[pb.Embedding(values=unit(i), speech_seconds=5.0)]))
            seen, token, pages = [], "", 0
            while True:
                r = s.ListSpeakers(pb.ListSpeakersRequest(collection="big", page_size=100, page_token=token))
                assert r.ByteSize() < 6000 + 2000 and r.total_size == 10
                seen += [x.speaker_id for x in r.speakers]
                pages += 1
                token = r.next_page_token
                if not token:
                    break
            assert sorted(seen) == [f"s{i}" for i in range(10)] and pages >= 3
    finally:
        srv.stop()


def _one_token_file(path, name: str, token: str, perms: str = '["admin"]') -> None:
    path.write_text(f'[[tokens]]\nname = "{name}"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
                    f"permissions = {perms}\n")


def test_tokens_rotate_on_reload_and_a_bad_file_keeps_the_old_ones(model_repo, tmp_path):
    """reload_tokens (SIGHUP): a removed token is refused from the next call, an added one works; a file that does
    not load changes nothing (the tokens in use stay, and the failure is counted)."""
    tokens = tmp_path / "tokens.toml"
    _one_token_file(tokens, "old", "old-secret")
    srv = ServerThread(make_config(model_repo, tmp_path / "data", models=["ge2e"], auth_tokens_file=str(tokens)))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SpeakerServiceStub(ch)

            def models(token: str):
                return stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {token}")])

            assert models("old-secret").default_model == "ge2e"
            _one_token_file(tokens, "new", "new-secret")
            assert srv.server.reload_tokens()
            assert code_of(lambda: models("old-secret"))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert models("new-secret").default_model == "ge2e"
            tokens.write_text("[[tokens]]\nname = 'broken'\n")  # no sha256
            assert not srv.server.reload_tokens()
            assert models("new-secret").default_model == "ge2e"  # kept
            registry = srv.server.metrics.registry
            assert registry.get_sample_value("spkserve_token_reloads_total", {"result": "ok"}) == 1.0
            assert registry.get_sample_value("spkserve_token_reloads_total", {"result": "error"}) == 1.0
    finally:
        srv.stop()


def test_sighup_reloads_the_token_file_of_a_running_server(model_repo, tmp_path):
    import signal
    import subprocess
    import sys

    tokens = tmp_path / "tokens.toml"
    _one_token_file(tokens, "old", "old-secret")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--metrics-port", "-1", "--http-port", "0",
                             "--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path / "data"),
                             "--model-repository", str(model_repo), "--auth-tokens-file", str(tokens)],
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if " ready: " in line:
                break
        _one_token_file(tokens, "new", "new-secret")
        proc.send_signal(signal.SIGHUP)
        for line in proc.stderr:
            if "token reload" in line:
                break
        assert "token reload: 1 tokens (new)" in line and proc.poll() is None  # still serving
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0
