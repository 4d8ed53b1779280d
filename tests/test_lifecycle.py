"""Server lifecycle: persistence across restart and kill -9, health transitions, SIGTERM drain,
auth, TLS, and the CLI interface that outside checks rely on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
from tests.conftest import ROOT, ServerThread, free_port, make_config

SPKSERVE = [sys.executable, "-m", "service.cli"]


def unit(seed: int, dim: int = 256) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class Proc:
    """``spkserve serve`` in a subprocess."""

    def __init__(self, repo: Path, data: Path, *extra: str, env: dict | None = None):
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.log = open(data.parent / f"server-{self.port}.log", "w")
        self.p = subprocess.Popen(
            SPKSERVE + ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                        "--http-port", str(self.http_port),
                        "--model-repository", str(repo), "--data-dir", str(data), *extra],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.target = f"127.0.0.1:{self.port}"
        self.wait_serving()

    def wait_serving(self, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            h = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < end:
                assert self.p.poll() is None, Path(self.log.name).read_text()
                try:
                    if h.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(Path(self.log.name).read_text())

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(SPKSERVE + [args[0], "--target", self.target, *args[1:]], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)
        self.log.close()

    def term(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        rc = self.p.wait(30)
        self.log.close()
        return rc


def test_acknowledged_enrollments_survive_kill9_and_deletes_persist(model_repo, tmp_path, speech_files):
    data = tmp_path / "data"
    srv = Proc(model_repo, data, "--default-model", "ge2e")
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            for i in range(20):
                s.Enroll(pb.EnrollRequest(collection="c1", speaker_id=f"spk{i}", embeddings=[pb.Embedding(values=unit(i), speech_seconds=5)],
                                          metadata={"i": str(i)}))
            s.Enroll(pb.EnrollRequest(collection="c1", speaker_id="spk3", embeddings=[pb.Embedding(values=unit(100), speech_seconds=5)]))
            s.DeleteSpeaker(pb.DeleteSpeakerRequest(collection="c1", speaker_id="spk7"))
            before = s.GetSpeaker(pb.GetSpeakerRequest(collection="c1", speaker_id="spk3", include_voiceprint=True))
    finally:
        srv.kill9()
    # a crash mid-append leaves a torn record at the log's end: it must be cut off, not fatal
    wal = sorted(data.glob("wal-*.log"))[-1]
    from service.store.wal import encode_record

    with open(wal, "ab") as f:
        f.write(encode_record({"op": "delete", "c": "c1", "tomb": "0" * 32, "ts": 1})[:21])
    srv = Proc(model_repo, data)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            listed = s.ListSpeakers(pb.ListSpeakersRequest(collection="c1", page_size=100))
            assert listed.total_size == 19 and "spk7" not in [x.speaker_id for x in listed.speakers]
            after = s.GetSpeaker(pb.GetSpeakerRequest(collection="c1", speaker_id="spk3", include_voiceprint=True))
            assert after.utterance_count == 2 and after.metadata["i"] == "3"
            assert np.array_equal(np.array(before.voiceprint), np.array(after.voiceprint))
            hit = s.Identify(pb.IdentifyRequest(collection="c1", probe=pb.Probe(embedding=pb.Embedding(values=unit(12)))))
            assert hit.candidates[0].speaker_id == "spk12"
            s.Enroll(pb.EnrollRequest(collection="c1", speaker_id="late", embeddings=[pb.Embedding(values=unit(55), speech_seconds=5)]))
        assert srv.term() == 0  # graceful: snapshot written
    finally:
        if srv.p.poll() is None:
            srv.kill9()
    assert list(data.glob("snapshot-*.bin"))
    srv = Proc(model_repo, data)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            assert s.ListSpeakers(pb.ListSpeakersRequest(collection="c1")).total_size == 20
    finally:
        srv.kill9()


def test_cli_interface(model_repo, tmp_path, speech_files):
    srv = Proc(model_repo, tmp_path / "data")
    try:
        f1, f2, f3 = (str(speech_files[n]) for n in ("flite-slt-1", "flite-slt-2", "flite-awb-1"))
        r = srv.cli("embed", f1, f2)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        assert [x["file"] for x in lines] == [f1, f2] and all(len(x["embedding"]) == 256 for x in lines)
        assert lines[0]["model"] == "ge2e"
        r = srv.cli("embed", "--model", "tiny-wavlm", f1)
        assert json.loads(r.stdout)["model"] == "tiny-wavlm" and len(json.loads(r.stdout)["embedding"]) == 32
        v = json.loads(srv.cli("verify", f1, f2).stdout)
        assert set(v) >= {"score", "decision", "threshold", "verdict", "llr", "speech_seconds"} and v["decision"] is True
        assert v["verdict"] == "ACCEPT" and v["speech_seconds"][0] > 2
        assert json.loads(srv.cli("verify", f1, f3).stdout)["decision"] is False
        e = json.loads(srv.cli("enroll", "--collection", "cli", "--speaker", "slt", f1).stdout)
        assert e["status"] == "NEEDS_MORE_SPEECH" and e["required_speech_seconds"] == 3.0  # 2.8 s of speech
        e = json.loads(srv.cli("enroll", "--collection", "cli", "--speaker", "slt", f1).stdout)
        assert e["status"] == "READY" and e["utterances"][0]["consistent"]
        assert srv.cli("enroll", "--collection", "cli", "--speaker", "awb", f3, f3).returncode == 0
        ident = json.loads(srv.cli("identify", "--collection", "cli", "--top-k", "2", f2).stdout)
        assert ident["candidates"][0]["speaker"] == "slt" and set(ident["candidates"][0]) == {"speaker", "score"}
        assert ident["rule"] == "open_set" and ident["collection_size"] == 2
        single = json.loads(srv.cli("identify", "--collection", "cli", "--single-pair", f2).stdout)
        assert single["rule"] == "single_pair" and single["decision_threshold"] < ident["decision_threshold"]
        far = json.loads(srv.cli("verify", "--target-far", "0.01", f1, f2).stdout)
        assert far["decision_scale"] == "llr" and far["multiple_speakers"] == [False, False]
        assert far["decision_threshold"] != v["decision_threshold"]
        upd = json.loads(srv.cli("update-speaker", "--collection", "cli", "--speaker", "slt", "--metadata", "desk=7",
                                 "--metadata", "floor=2").stdout)
        assert upd["metadata"] == {"desk": "7", "floor": "2"}
        upd = json.loads(srv.cli("update-speaker", "--collection", "cli", "--speaker", "slt", "--remove-metadata",
                                 "desk").stdout)
        assert upd["metadata"] == {"floor": "2"} and upd["speaker"] == "slt"
        bad = srv.cli("update-speaker", "--collection", "cli", "--speaker", "slt", "--metadata", "x")
        assert bad.returncode != 0 and "update-speaker: --metadata must be KEY=VALUE" in bad.stderr
        assert srv.cli("delete", "--collection", "cli", "--speaker", "slt").returncode == 0
        bad = srv.cli("delete", "--collection", "cli", "--speaker", "slt")
        assert bad.returncode != 0 and bad.stderr.startswith("NOT_FOUND:")
        bad = srv.cli("delete-collection", "--collection", "cli")
        assert bad.returncode != 0 and bad.stderr.startswith("FAILED_PRECONDITION:") and "force" in bad.stderr
        assert srv.cli("delete-collection").returncode == 2  # no default collection for a whole deletion
        gone = json.loads(srv.cli("delete-collection", "--collection", "cli", "--force").stdout)
        assert gone == {"deleted": "cli", "model": "ge2e", "model_version": gone["model_version"],
                        "speakers_deleted": 1}
        bad = srv.cli("embed", str(ROOT / "pyproject.toml"))
        assert bad.returncode != 0 and bad.stderr.startswith("INVALID_ARGUMENT:")
    finally:
        assert srv.term() == 0


def test_serve_rejects_bad_config(model_repo, tmp_path):
    r = subprocess.run(SPKSERVE + ["serve", "--port", "99999"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "port" in r.stderr
    r = subprocess.run(SPKSERVE + ["serve", "--port", "0", "--metrics-port", "-1", "--http-port", "0", "--model-repository",
                                   str(tmp_path / "none"), "--data-dir", str(tmp_path / "d")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_health_transitions_and_graceful_drain(model_repo, tmp_path, speech_files):
    """NOT_SERVING before models are ready and after shutdown starts; in-flight calls finish."""
    import asyncio

    from service.server import SpeakerServer

    loop = asyncio.new_event_loop()
    try:
        server = SpeakerServer(make_config(model_repo, tmp_path, models=["ge2e"], max_wait_ms=200.0,
                                           shutdown_delay_seconds=0.5))

        async def scenario():
            port = await server.start()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                h = health_pb2_grpc.HealthStub(ch)
                s = pb_grpc.SpeakerServiceStub(ch)
                first = (await h.Check(health_pb2.HealthCheckRequest())).status
                await server.wait_ready(120)
                ready = (await h.Check(health_pb2.HealthCheckRequest())).status
                # requests in flight when shutdown begins (they wait max_wait_ms in the batcher)
                audio = pb.Audio(encoded=speech_files["flite-kal-1"].read_bytes())
                calls = [asyncio.ensure_future(s.Embed(pb.EmbedRequest(audio=audio))) for _ in range(4)]
                await asyncio.sleep(0.05)
                stopping = asyncio.ensure_future(server.stop(5.0))
                await asyncio.sleep(0.01)
                during = (await h.Check(health_pb2.HealthCheckRequest())).status
                late = await s.Embed(pb.EmbedRequest(audio=audio))  # still answered during the delay
                results = await asyncio.gather(*calls, asyncio.sleep(0, late))
                await stopping
                return first, ready, during, results

        first, ready, during, results = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert first == health_pb2.HealthCheckResponse.NOT_SERVING
    assert ready == health_pb2.HealthCheckResponse.SERVING
    assert during == health_pb2.HealthCheckResponse.NOT_SERVING
    assert all(len(r.embedding) == 256 for r in results)


def test_auth_token(model_repo, tmp_path, speech_files):
    srv = ServerThread(make_config(model_repo, tmp_path, models=["ge2e"], auth_token="s3cret"))
    try:
        audio = pb.Audio(encoded=speech_files["flite-kal-1"].read_bytes())
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            for md in ([], [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
                with pytest.raises(grpc.RpcError) as e:
                    s.Embed(pb.EmbedRequest(audio=audio), metadata=md)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                s.EmbedStream(iter([pb.EmbedStreamRequest(config=pb.StreamConfig())]))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = s.Embed(pb.EmbedRequest(audio=audio), metadata=[("authorization", "Bearer s3cret")])
            assert len(ok.embedding) == 256
            # health probes need no token
            h = health_pb2_grpc.HealthStub(ch)
            assert h.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop()


def test_tls(model_repo, tmp_path, speech_files):
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl command not available to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    http_port = free_port()
    srv = ServerThread(make_config(model_repo, tmp_path / "d", models=["ge2e"], tls_cert=str(cert), tls_key=str(key),
                                   http_port=http_port))
    try:
        # HTTP and the live WebSocket are served over TLS too, with the same certificate
        import ssl

        import requests

        assert requests.get(f"https://localhost:{http_port}/v1/models", verify=str(cert), timeout=10).ok
        with pytest.raises(requests.exceptions.ConnectionError):  # plaintext HTTP to the TLS port
            requests.get(f"http://localhost:{http_port}/v1/models", timeout=10)
        from websockets.sync.client import connect  # a dependency of the server (uvicorn's WebSocket protocol)

        with connect(f"wss://localhost:{http_port}/v1/verify:stream",
                                       ssl=ssl.create_default_context(cafile=str(cert))) as ws:
            ws.send('{"reference": {"speaker": {"collection": "none", "speakerId": "x"}}}')
            assert "NOT_FOUND" in ws.recv(timeout=10)
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(f"localhost:{srv.port}", creds) as ch:
            r = pb_grpc.SpeakerServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
            assert r.default_model == "ge2e"
        with grpc.insecure_channel(srv.target) as ch:  # plaintext to a TLS port fails
            with pytest.raises(grpc.RpcError):
                pb_grpc.SpeakerServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=3)
        # the container's health check follows the configured port and TLS (one config, env or file)
        from service.healthcheck import main as healthcheck

        env = {"SPKSERVE_PORT": str(srv.port), "SPKSERVE_TLS_CERT": str(cert), "SPKSERVE_TLS_KEY": str(key)}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            assert healthcheck([]) == 0
            mp.delenv("SPKSERVE_TLS_CERT")
            mp.delenv("SPKSERVE_TLS_KEY")
            assert healthcheck(["--timeout", "2"]) == 1  # plaintext to the TLS port: not healthy
    finally:
        srv.stop()


def test_non_commercial_models_load_only_when_named(model_repo, tmp_path, caplog):
    import json
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    card = repo / "tiny-wavlm" / "model.json"
    meta = json.loads(card.read_text())
    card.write_text(json.dumps(dict(meta, license="research only", commercial_use=False)))
    srv = ServerThread(make_config(repo, tmp_path / "a"))
    try:
        assert "tiny-wavlm" not in srv.server.engine.models and "ge2e" in srv.server.engine.models
        assert "not loading model tiny-wavlm" in caplog.text and "research only" in caplog.text
    finally:
        srv.stop()
    srv = ServerThread(make_config(repo, tmp_path / "b", models=["ge2e", "tiny-wavlm"]))
    try:
        assert "tiny-wavlm" in srv.server.engine.models
        assert "does not permit commercial use" in caplog.text
    finally:
        srv.stop()


def test_models_load_reload_and_unload_while_serving(model_repo, tmp_path):
    import json
    import shutil

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    srv = ServerThread(make_config(repo, tmp_path / "data", models=["ge2e"], model_control=True))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            audio = pb.Audio(encoded=(ROOT / "models/reference/audio/flite-slt-1.wav").read_bytes())
            with pytest.raises(grpc.RpcError) as e:
                s.Embed(pb.EmbedRequest(model="tiny-wavlm", audio=audio))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            r = s.LoadModel(pb.LoadModelRequest(model="tiny-wavlm"))
            assert r.model.name == "tiny-wavlm" and not r.replaced
            assert len(s.Embed(pb.EmbedRequest(model="tiny-wavlm", audio=audio)).embedding) == 32
            assert health.Check(health_pb2.HealthCheckRequest(service="spkserve.model.tiny-wavlm")).status == \
                health_pb2.HealthCheckResponse.SERVING
            card = repo / "tiny-wavlm" / "model.json"
            card.write_text(json.dumps(dict(json.loads(card.read_text()), version="test-2")))
            r = s.LoadModel(pb.LoadModelRequest(model="tiny-wavlm"))  # reload: a new version
            assert r.replaced and r.previous_version == "test" and r.model.version == "test-2"
            assert s.GetModelInfo(pb.GetModelInfoRequest(name="tiny-wavlm")).version == "test-2"
            assert s.UnloadModel(pb.UnloadModelRequest(model="tiny-wavlm")).version == "test-2"
            with pytest.raises(grpc.RpcError) as e:
                s.Embed(pb.EmbedRequest(model="tiny-wavlm", audio=audio))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert health.Check(health_pb2.HealthCheckRequest(service="spkserve.model.tiny-wavlm")).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            for req, code, words in ((pb.UnloadModelRequest(model="ge2e"), grpc.StatusCode.FAILED_PRECONDITION, "default"),
                                     (pb.LoadModelRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "repository"),
                                     (pb.LoadModelRequest(model="../etc"), grpc.StatusCode.INVALID_ARGUMENT, "model")):
                call = s.UnloadModel if isinstance(req, pb.UnloadModelRequest) else s.LoadModel
                with pytest.raises(grpc.RpcError) as e:
                    call(req)
                assert e.value.code() == code and words in e.value.details()
            assert len(s.Embed(pb.EmbedRequest(audio=audio)).embedding) == 256  # the default model kept serving
    finally:
        srv.stop()


def test_a_collection_is_bound_to_its_model_version(model_repo, tmp_path):
    import json
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    srv = ServerThread(make_config(repo, tmp_path / "data", models=["ge2e", "tiny-wavlm"], model_control=True))
    vec = list(np.random.default_rng(0).normal(size=32))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            s.Enroll(pb.EnrollRequest(model="tiny-wavlm", collection="v", speaker_id="a",
                                      embeddings=[pb.Embedding(values=vec, speech_seconds=5)]))
            info = {c.name: c for c in s.ListCollections(pb.ListCollectionsRequest()).collections}["v"]
            assert info.model == "tiny-wavlm" and info.model_version == "test"
            card = repo / "tiny-wavlm" / "model.json"
            card.write_text(json.dumps(dict(json.loads(card.read_text()), version="test-2")))
            s.LoadModel(pb.LoadModelRequest(model="tiny-wavlm"))  # same name, another version
            probe = pb.Probe(embedding=pb.Embedding(values=vec))
            for call in (lambda: s.Identify(pb.IdentifyRequest(collection="v", probe=probe)),
                         lambda: s.Verify(pb.VerifyRequest(model="tiny-wavlm", a=probe, b=pb.Probe(
                             speaker=pb.SpeakerRef(collection="v", speaker_id="a")))),
                         lambda: s.Enroll(pb.EnrollRequest(collection="v", speaker_id="b", embeddings=[
                             pb.Embedding(values=vec, speech_seconds=5)]))):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "version 'test'" in e.value.details() and "'test-2'" in e.value.details()
                assert "MigrateCollection" in e.value.details()  # says how to move it
    finally:
        srv.stop()
    srv = ServerThread(make_config(repo, tmp_path / "data", models=["ge2e", "tiny-wavlm"]))  # the binding persists
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            assert {c.name: c for c in s.ListCollections(pb.ListCollectionsRequest()).collections}["v"].model_version == "test"
    finally:
        srv.stop()


def test_migrate_a_collection_to_another_model_from_retained_speech(model_repo, tmp_path, speech_files):
    srv = ServerThread(make_config(model_repo, tmp_path / "data", models=["ge2e", "tiny-wavlm"],
                                   retain_enrollment_audio=True, model_control=True))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            audio = {n: pb.Audio(encoded=speech_files[n].read_bytes()) for n in ("flite-slt-1", "flite-awb-1")}
            s.Enroll(pb.EnrollRequest(collection="src", speaker_id="slt", audio=[audio["flite-slt-1"]]))
            s.Enroll(pb.EnrollRequest(collection="src", speaker_id="awb", audio=[audio["flite-awb-1"]]))
            s.Enroll(pb.EnrollRequest(collection="src", speaker_id="vec", embeddings=[
                pb.Embedding(values=list(np.random.default_rng(0).normal(size=256)), speech_seconds=5)]))
            r = s.MigrateCollection(pb.MigrateCollectionRequest(collection="src", target_collection="dst",
                                                                model="tiny-wavlm"))
            assert r.migrated == 2 and list(r.skipped) == ["vec"] and r.model_version == "test"
            got = s.GetSpeaker(pb.GetSpeakerRequest(collection="dst", speaker_id="slt", include_voiceprint=True))
            direct = s.Embed(pb.EmbedRequest(model="tiny-wavlm", audio=audio["flite-slt-1"])).embedding
            assert got.model == "tiny-wavlm" and got.utterance_count == 1
            assert float(np.dot(got.voiceprint, direct)) > 0.999  # the same speech, embedded by the new model
            with pytest.raises(grpc.RpcError) as e:
                s.MigrateCollection(pb.MigrateCollectionRequest(collection="src", target_collection="dst",
                                                                model="tiny-wavlm"))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "target_collection" in e.value.details()
            s.DeleteSpeaker(pb.DeleteSpeakerRequest(collection="src", speaker_id="slt"))
        audio_dir = tmp_path / "data" / "audio"
        assert len(list(audio_dir.iterdir())) == 3  # awb in src, slt and awb in dst: the deleted one's file is gone
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in audio_dir.iterdir())
    finally:
        srv.stop()


def test_migrate_without_retained_speech_is_refused_naming_the_option(model_repo, tmp_path, speech_files):
    srv = ServerThread(make_config(model_repo, tmp_path / "data", models=["ge2e", "tiny-wavlm"], model_control=True))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            s.Enroll(pb.EnrollRequest(collection="src", speaker_id="slt",
                                      audio=[pb.Audio(encoded=speech_files["flite-slt-1"].read_bytes())]))
            with pytest.raises(grpc.RpcError) as e:
                s.MigrateCollection(pb.MigrateCollectionRequest(collection="src", target_collection="dst",
                                                                model="tiny-wavlm"))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert e.value.details().startswith("retain_enrollment_audio:") and "option is off" in e.value.details()
            assert "dst" not in {c.name for c in s.ListCollections(pb.ListCollectionsRequest()).collections}
    finally:
        srv.stop()


def _serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--metrics-port", "-1", "--http-port", "0", *args],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])


def test_second_server_on_a_busy_data_dir_or_port_exits_with_one_line(model_repo, tmp_path):
    srv = ServerThread(make_config(model_repo, tmp_path / "data", models=["ge2e"]))
    try:
        r = _serve_cli("--data-dir", str(tmp_path / "data"), "--port", "0", "--model-repository", str(model_repo))
        assert r.returncode == 1
        lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and "is in use by another process" in lines[0] and "cannot start" in lines[0]
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            r = _serve_cli("--data-dir", str(tmp_path / "other"), "--host", "127.0.0.1", "--port", str(port),
                           "--model-repository", str(model_repo))
        lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1, lines
        assert f"option 'port': cannot listen on 127.0.0.1:{port}" in lines[0] and "Traceback" not in r.stderr
    finally:
        srv.stop()


@pytest.mark.parametrize("args, words", [
    (["--log-level", "LOUD"], "option 'log_level' = 'LOUD': must be one of DEBUG, INFO"),  # was: a ValueError traceback
    (["--auth-tokens-file", "/nonexistent/tokens.toml"], "option 'auth_tokens_file'"),  # was: a ConfigError traceback
    (["--data-dir", "/proc/spkserve-data"], "option 'data_dir' = '/proc/spkserve-data': cannot create it"),
])
def test_a_bad_serve_option_is_one_line_and_status_2(model_repo, tmp_path, args, words):
    """Options that only prove bad when the server starts end it like the ones load_config refuses."""
    r = _serve_cli("--data-dir", str(tmp_path / "data"), "--port", "0", "--model-repository", str(model_repo), *args)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if " INFO " not in line and " WARNING " not in line]
    assert r.returncode == 2 and len(errors) == 1 and words in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_serve_check_loads_every_model_and_writes_nothing(model_repo, tmp_path):
    """`spkserve serve --check`: status 0 and a JSON summary (every model opened and warmed up) for a good setup,
    status 2 and one line naming the file at fault otherwise; no port is bound and no data directory created."""
    import json
    import shutil

    data = tmp_path / "data" / "sub"
    r = _serve_cli("--check", "--data-dir", str(data), "--port", "0", "--model-repository", str(model_repo),
                   "--log-level", "ERROR")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["ok"] and summary["default_model"] == "ge2e" and "ge2e" in {m["name"] for m in summary["models"]}
    assert all(m["warmup_seconds"] >= 0 and m["embedding_dim"] > 0 for m in summary["models"])
    assert summary["warnings"] == []
    assert not (tmp_path / "data").exists()  # checked, not created
    import os

    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--check", "--metrics-port", "-1", "--data-dir",
                        str(data), "--model-repository", str(model_repo)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SPKSERVE_INTRA_OP_THREAD": "1"})  # misspelt: ignored, so said
    assert r.returncode == 0 and json.loads(r.stdout)["warnings"] == [
        "environment variable SPKSERVE_INTRA_OP_THREAD is not an option and is ignored (did you mean "
        "SPKSERVE_INTRA_OP_THREADS?)"], r.stderr
    assert "WARNING spkserve.config: environment variable SPKSERVE_INTRA_OP_THREAD" in r.stderr
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    (repo / "ge2e" / "model.onnx").write_bytes(b"not an onnx graph")
    r = _serve_cli("--check", "--data-dir", str(data), "--model-repository", str(repo), "--log-level", "ERROR")
    assert r.returncode == 2 and r.stderr.startswith("spkserve serve --check: ") and "ge2e" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "tokens.toml").write_text("[[tokens]]\nname = 'x'\n")
    r = _serve_cli("--check", "--data-dir", str(data), "--model-repository", str(model_repo),
                   "--auth-tokens-file", str(tmp_path / "tokens.toml"))
    assert r.returncode == 2 and "option 'auth_tokens_file'" in r.stderr and "sha256" in r.stderr


def test_unreadable_tls_files_and_an_unknown_metrics_host_are_named(model_repo, tmp_path):
    (tmp_path / "tls.toml").write_text(f'tls_cert = "{tmp_path}/no.pem"\ntls_key = "{tmp_path}/no.key"\n')
    r = _serve_cli("--config", str(tmp_path / "tls.toml"), "--data-dir", str(tmp_path / "data"), "--port", "0",
                   "--model-repository", str(model_repo))
    assert r.returncode == 2 and f"option 'tls_key' = '{tmp_path}/no.key': cannot read it" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--metrics-host", "no-such-host.invalid",
                        "--metrics-port", "0", "--http-port", "0", "--port", "0", "--data-dir", str(tmp_path / "d"),
                        "--model-repository", str(model_repo)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "option 'metrics_host': cannot resolve 'no-such-host.invalid'" in r.stderr
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr  # was: gRPC's __del__


def test_a_failed_start_leaves_nothing_listening(model_repo, tmp_path, monkeypatch):
    """When a later listener fails (here HTTP), the gRPC port already bound is released before start() raises."""
    import asyncio

    from service.server import SpeakerServer

    port, http_port = free_port(), free_port()

    async def refuse(self):
        raise OSError("option 'http_port': cannot listen (injected)")

    monkeypatch.setattr(SpeakerServer, "_start_http", refuse)
    server = SpeakerServer(make_config(model_repo, tmp_path / "data", models=["ge2e"], port=port, http_port=http_port))

    async def start():
        with pytest.raises(OSError, match="injected"):
            await server.start()

    asyncio.run(start())
    with socket.socket() as again:  # free again: nothing of the failed server listens
        again.bind(("127.0.0.1", port))


def test_sigterm_while_the_store_is_unreachable_stops_cleanly(model_repo, tmp_path):
    """Stopped while start-up still waits for the speaker store: a plain line saying so, status 0, no empty
    "start-up failed:" (a CancelledError has no message)."""
    import signal

    pytest.importorskip("pymilvus")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--metrics-port", "-1", "--http-port", "0",
                             "--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path / "data"),
                             "--model-repository", str(model_repo), "--index-backend", "milvus",
                             "--milvus-uri", "http://127.0.0.1:1"], stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # start-up reaches the store (nothing listens on port 1: it waits and retries)
        lines.append(line)
        if "listening on" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=60)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert "start-up cancelled: the server is stopping before it was ready" in log and "start-up failed" not in log
    assert log.index("start-up cancelled") < log.index("INFO spkserve.server: stopped") and "Traceback" not in log


def test_a_stalled_upload_ends_with_deadline_exceeded(model_repo, tmp_path):
    """EmbedStream / DiarizeStream over gRPC, and their HTTP :stream routes: an upload that sends nothing for
    stream_idle_timeout_seconds is ended (DEADLINE_EXCEEDED / 504 naming the option), not held open forever."""
    import time

    import requests

    http_port = free_port()
    srv = ServerThread(make_config(model_repo, tmp_path / "d", models=["ge2e"], http_port=http_port,
                                   stream_idle_timeout_seconds=0.5))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SpeakerServiceStub(ch)

            def stalled(kind, config):
                yield kind(config=config)
                yield kind(chunk=b"RIFF")
                time.sleep(3)  # then nothing: the server gives up after 0.5 s

            for call, kind, config in ((stub.EmbedStream, pb.EmbedStreamRequest, pb.StreamConfig()),
                                       (stub.DiarizeStream, pb.DiarizeStreamRequest, pb.DiarizeStreamConfig())):
                with pytest.raises(grpc.RpcError) as e:
                    call(stalled(kind, config), timeout=30)
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
                assert "stream_idle_timeout_seconds" in e.value.details()

        def trickle():
            yield b"RIFF"
            time.sleep(3)
            yield b"more"

        r = requests.post(f"http://127.0.0.1:{http_port}/v1/embed:stream", data=trickle(), timeout=30)
        assert r.status_code == 504 and "stream_idle_timeout_seconds" in r.json()["error"]["message"], r.text
    finally:
        srv.stop()


def test_model_control_is_off_by_default(model_repo, tmp_path, caplog):
    """Without model_control or an admin token, LoadModel/UnloadModel/MigrateCollection are refused."""
    srv = ServerThread(make_config(model_repo, tmp_path / "data", models=["ge2e"], host="0.0.0.0"))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            for call in (lambda: s.LoadModel(pb.LoadModelRequest(model="tiny-wavlm")),
                         lambda: s.UnloadModel(pb.UnloadModelRequest(model="ge2e")),
                         lambda: s.MigrateCollection(pb.MigrateCollectionRequest(collection="a", target_collection="b",
                                                                                 model="ge2e"))):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert e.value.details().startswith("model_control:") and "SPKSERVE_MODEL_CONTROL" in e.value.details()
            assert [m.name for m in s.ListModels(pb.ListModelsRequest()).models] == ["ge2e"]  # nothing changed
    finally:
        srv.stop()
    assert any("without authentication" in r.getMessage() for r in caplog.records)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_unauthenticated_uploads_are_refused_before_they_are_received(model_repo, tmp_path):
    """8 concurrent unauthenticated 60 MB requests (and 8 of 15 MB, under the message limit) raise the server's
    peak memory by well under 300 MB: the token is checked before the request is read."""
    import concurrent.futures as cf
    import hashlib

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[tokens]]\nname = "ops"\nsha256 = "{hashlib.sha256(b"secret").hexdigest()}"\n'
                      'permissions = ["admin"]\n')
    (tmp_path / "data").mkdir()
    srv = Proc(model_repo, tmp_path / "data", "--auth-tokens-file", str(tokens))
    try:
        before = _peak_rss_mb(srv.p.pid)
        opts = [("grpc.max_send_message_length", 128 << 20)]
        with grpc.insecure_channel(srv.target, options=opts) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)

            def send(size: int) -> grpc.StatusCode:
                try:
                    s.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=b"\0" * size)), timeout=60)
                except grpc.RpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            for size in (60 << 20, 15 << 20):
                with cf.ThreadPoolExecutor(8) as pool:
                    codes = list(pool.map(send, [size] * 8))
                assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      grpc.StatusCode.UNAVAILABLE}, codes
                assert grpc.StatusCode.OK not in codes
        grown = _peak_rss_mb(srv.p.pid) - before
        assert grown < 300, f"peak RSS grew {grown:.0f} MB"
    finally:
        assert srv.term() == 0


def test_request_bytes_in_flight_are_capped(model_repo, tmp_path, speech_files):
    """With max_inflight_request_mb = 1, an open stream holding 0.9 MB makes a 0.2 MB request wait its turn."""
    import threading

    srv = ServerThread(make_config(model_repo, tmp_path / "data", models=["ge2e"], max_message_mb=1,
                                   max_inflight_request_mb=1))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            release = threading.Event()

            def held():
                yield pb.EmbedStreamRequest(config=pb.StreamConfig())
                for _ in range(9):
                    yield pb.EmbedStreamRequest(chunk=b"\1" * 100_000)
                release.wait(30)

            stream = s.EmbedStream.future(held())
            end = time.monotonic() + 20
            while srv.server.request_bytes.used < 900_000 and time.monotonic() < end:  # the chunks have arrived
                time.sleep(0.05)
            audio = pb.Audio(encoded=speech_files["flite-slt-1"].read_bytes() + b"\0" * 150_000)
            with pytest.raises(grpc.RpcError) as e:
                s.Embed(pb.EmbedRequest(audio=audio))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_inflight_request_mb (1 MiB)" in e.value.details()
            release.set()
            with pytest.raises(grpc.RpcError):
                stream.result(timeout=30)  # the held stream is no audio: refused, and its bytes released
            r = s.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=speech_files["flite-slt-1"].read_bytes())))
            assert len(r.embedding) == 256
    finally:
        srv.stop()


@pytest.mark.slow
def test_an_hour_through_embed_stream_in_bounded_memory(model_repo, tmp_path, speech_files):
    """One hour of 16 kHz PCM (115 MB) is embedded window by window; the server's peak memory grows < 360 MB.

    Most of the growth is the inference workers' batch memory (about 90 MB each here), not the
    audio: the workers are pinned to two so the bound holds on machines with more cores.
    """
    import soundfile as sf

    (tmp_path / "data").mkdir()
    srv = Proc(model_repo, tmp_path / "data", env={"SPKSERVE_INFERENCE_WORKERS": "2"})
    try:
        voice, _ = sf.read(speech_files["espeak-en-1"], dtype="float32")  # 6 s of speech
        period = np.concatenate([voice, np.zeros(4 * 16000, np.float32)])  # (10 s,)
        pcm = (np.clip(period, -1, 1) * 32767).astype("<i2").tobytes()
        n = int(3600 // (len(period) / 16000))
        before = _peak_rss_mb(srv.p.pid)

        def parts():
            yield pb.EmbedStreamRequest(config=pb.StreamConfig(pcm=pb.PcmFormat(sample_rate=16000, encoding=pb.PCM_S16LE)))
            for _ in range(n):  # just under an hour
                yield pb.EmbedStreamRequest(chunk=pcm)

        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            r = s.EmbedStream(parts(), timeout=600)
            one = s.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=speech_files["espeak-en-1"].read_bytes())))
        assert r.speech.audio_seconds == pytest.approx(n * len(period) / 16000, abs=0.1) and r.speech.audio_seconds > 3550
        assert 0.5 * 3600 < r.speech_seconds < 0.7 * 3600  # the voice, not the pauses
        assert float(np.dot(r.embedding, one.embedding)) > 0.95
        grown = _peak_rss_mb(srv.p.pid) - before
        assert grown < 360, f"peak RSS grew {grown:.0f} MB for an hour of audio"
    finally:
        assert srv.term() == 0


@pytest.mark.slow
def test_an_hour_through_diarize_stream_in_bounded_memory(model_repo, tmp_path, speech_files):
    """One hour of a two-voice conversation (16 kHz PCM, 115 MB) is diarized in blocks: the server's peak memory
    grows < 500 MB, both voices are found and the turns cover the hour; cancelled streams leave nothing behind."""
    import soundfile as sf

    (tmp_path / "data").mkdir()
    srv = Proc(model_repo, tmp_path / "data", env={"SPKSERVE_INFERENCE_WORKERS": "2"})  # bound independent of cores
    try:
        a, _ = sf.read(speech_files["flite-slt-1"], dtype="float32")
        b, _ = sf.read(speech_files["flite-awb-1"], dtype="float32")
        gap = np.zeros(int(0.7 * 16000), np.float32)
        period = np.concatenate([a, gap, b, gap])
        pcm = (np.clip(period, -1, 1) * 32767).astype("<i2").tobytes()
        n = int(3600 // (len(period) / 16000))
        before = _peak_rss_mb(srv.p.pid)

        def parts(count):
            yield pb.DiarizeStreamRequest(config=pb.DiarizeStreamConfig(
                pcm=pb.PcmFormat(sample_rate=16000, encoding=pb.PCM_S16LE)))
            for _ in range(count):
                yield pb.DiarizeStreamRequest(chunk=pcm)

        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            for _ in range(3):  # cancelled mid-way, while windows are in the batcher
                call = s.DiarizeStream.future(parts(n), timeout=600)
                time.sleep(3.0)
                call.cancel()
            r = s.DiarizeStream(parts(n), timeout=600)
        assert r.speech.audio_seconds == pytest.approx(n * len(period) / 16000, abs=0.1) and r.speech.audio_seconds > 3550
        assert len(r.speakers) == 2 and len(r.segments) > 0.9 * 2 * n
        assert r.segments[-1].end_seconds > 3500
        grown = _peak_rss_mb(srv.p.pid) - before
        assert grown < 500, f"peak RSS grew {grown:.0f} MB for an hour of audio"
    finally:
        assert srv.term() == 0
