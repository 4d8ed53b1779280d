"""Live verification over a WebSocket (/v1/verify:stream): the VerifyStream conversation for clients that cannot
speak gRPC (browsers), against a real server: results, the final verdict, errors as close codes, tokens, and a
client that goes away."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
import soundfile as sf

websockets_client = pytest.importorskip("websockets.sync.client")

from tests.conftest import REFERENCE, ServerThread, free_port, make_config, wait_for_sample  # noqa: E402

AUDIO = REFERENCE / "audio"


@pytest.fixture(scope="module")
def live(model_repo, tmp_path_factory):
    """A server with HTTP on and two tokens (team-a read/write, team-b read); `slt` enrolled in team-a."""
    d = tmp_path_factory.mktemp("ws")
    tokens = {"a": ("tok-a", "team-a", '["read", "write"]'), "b": ("tok-b", "team-b", '["read"]')}
    (d / "tokens.toml").write_text("".join(
        f'[[tokens]]\nname = "{n}"\nsha256 = "{hashlib.sha256(t.encode()).hexdigest()}"\n'
        f'collections = ["{c}"]\npermissions = {p}\n' for n, (t, c, p) in tokens.items()))
    srv = ServerThread(make_config(model_repo, d / "data", http_port=free_port(), auth_tokens_file=str(d / "tokens.toml")))
    import requests

    base = f"http://127.0.0.1:{srv.server.http_port}"
    r = requests.post(f"{base}/v1/collections/team-a/speakers/slt/enroll", headers={"authorization": "Bearer tok-a"},
                      files=[("audio", (f"{n}.wav", (AUDIO / f"{n}.wav").read_bytes())) for n in ("flite-slt-1",)],
                      timeout=60)
    assert r.status_code == 200, r.text
    yield base.replace("http://", "ws://") + "/v1/verify:stream", srv
    srv.stop()


def _pcm(name: str, repeat: int = 1) -> tuple[bytes, int]:
    wave, rate = sf.read(AUDIO / f"{name}.wav", dtype="int16")
    return np.tile(wave, repeat).astype("<i2").tobytes(), rate


def _config(rate: int, speaker: str = "slt", collection: str = "team-a") -> str:
    return json.dumps({"reference": {"speaker": {"collection": collection, "speakerId": speaker}},
                       "pcm": {"sampleRate": rate, "encoding": "PCM_S16LE"}})


def _talk(url: str, first: str, chunks: list, end: bool = True, headers=None) -> tuple[list[dict], int | None]:
    """Send the config, the chunks and the end mark; every message the server sent, and its close code."""
    from websockets.exceptions import ConnectionClosed

    with websockets_client.connect(url, additional_headers=headers) as ws:
        try:
            for message in [first, *chunks] + ([json.dumps({"end": True})] if end else []):
                ws.send(message)
        except ConnectionClosed:  # refused early (e.g. the token): what the server said is still to be read
            pass
        out = []
        try:
            while True:
                out.append(json.loads(ws.recv(timeout=60)))
        except Exception:  # noqa: BLE001 - the server closed the socket (normally or with an error code)
            return out, ws.close_code


def test_a_live_stream_over_a_websocket_gives_results_then_a_final_verdict(live):
    url, _ = live
    pcm, rate = _pcm("flite-slt-2", 3)
    step = rate  # 0.5 s of 16-bit audio per message
    results, code = _talk(url, _config(rate), [pcm[i:i + step] for i in range(0, len(pcm), step)],
                          headers={"authorization": "Bearer tok-a"})
    assert code == 1000 and results[-1]["final"] is True and results[-1]["verdict"] == "VERDICT_ACCEPT", results
    assert len(results) >= 3 and not any(r["final"] for r in results[:-1])  # provisional results came first
    assert [r["speechSeconds"] for r in results] == sorted(r["speechSeconds"] for r in results)
    # a browser cannot set headers: the token may come as access_token
    other, _ = _pcm("flite-awb-1")
    results, code = _talk(f"{url}?access_token=tok-a", _config(rate), [other])
    assert code == 1000 and results[-1]["final"] and results[-1]["verdict"] == "VERDICT_REJECT", results


@pytest.mark.parametrize("first, chunks, token, close, words", [
    (None, [], "wrong", 4401, "authorization: invalid token"),
    (None, [], "tok-b", 4403, "team-a"),  # another tenant's collection
    ("slt-not-enrolled", [], "tok-a", 4404, "speaker_id"),
    ('{"bogus": 1}', [], "tok-a", 4400, "config.bogus: VerifyStreamConfig has no field"),
    ("not json", [], "tok-a", 4400, "config: not valid JSON"),
    (None, ["text instead of audio"], "tok-a", 4400, "chunk: message 1"),
    (None, [b"\x01"], "tok-a", 4400, "unfinished sample frame"),
])
def test_errors_end_the_socket_with_the_grpc_status_as_close_code(live, first, chunks, token, close, words):
    url, _ = live
    if first is None:
        first = _config(16000)
    elif first == "slt-not-enrolled":
        first = _config(16000, speaker="nobody")
    out, code = _talk(url, first, chunks, headers={"authorization": f"Bearer {token}"})
    assert code == close and len(out) == 1 and words in out[0]["error"]["message"], (code, out)


def test_a_silent_socket_ends_with_deadline_exceeded(model_repo, tmp_path):
    """Nothing sent for stream_idle_timeout_seconds: DEADLINE_EXCEEDED as close code 4504, naming the option."""
    srv = ServerThread(make_config(model_repo, tmp_path / "data", models=["ge2e"], http_port=free_port(),
                                   stream_idle_timeout_seconds=0.5))
    try:
        url = f"ws://127.0.0.1:{srv.server.http_port}/v1/verify:stream"
        ref = json.dumps({"reference": {"embedding": {"values": [1.0] + [0.0] * 255}}})
        out, code = _talk(url, ref, [], end=False)  # the config, then silence
        assert code == 4504 and out[-1]["error"]["code"] == "DEADLINE_EXCEEDED", (code, out)
        assert "stream_idle_timeout_seconds" in out[-1]["error"]["message"]
    finally:
        srv.stop()


def test_a_client_that_goes_away_frees_its_stream(live, caplog):
    url, srv = live
    pcm, rate = _pcm("flite-slt-2", 4)
    with websockets_client.connect(url, additional_headers={"authorization": "Bearer tok-a"}) as ws:
        ws.send(_config(rate))
        for i in range(0, len(pcm) // 2, rate):
            ws.send(pcm[i:i + rate])
        ws.recv(timeout=60)  # the stream is under way
    registry = srv.server.metrics.registry
    assert wait_for_sample(registry, "spkserve_http_requests_total", {"route": "VerifyStream", "status": "499"}, 1.0) == 1.0
    assert registry.get_sample_value("spkserve_live_streams", {"model": "ge2e"}) == 0.0
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _page_text(url: str, expression: str, done, profile, setup: tuple[str, str] | None = None,
               timeout: float = 60.0, flags: tuple[str, ...] = (), actions: tuple[tuple[float, str], ...] = ()) -> str:
    """Load ``url`` in headless chromium and evaluate ``expression`` (DevTools protocol) until ``done(value)``;
    ``setup``: (a page to load first, an expression to run there), e.g. to store a token for the origin;
    ``actions``: (seconds to wait, an expression to run) after the page loads, e.g. clicks."""
    import subprocess
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--user-data-dir={profile}", f"--remote-debugging-port={port}", *flags, "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5))
                page = next(t for t in pages if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                time.sleep(0.1)
        with websockets_client.connect(page["webSocketDebuggerUrl"], max_size=None) as devtools:
            ids = iter(range(1, 1 << 30))

            def call(method: str, **params) -> dict:
                n = next(ids)
                devtools.send(json.dumps({"id": n, "method": method, "params": params}))
                while (reply := json.loads(devtools.recv(timeout=30))).get("id") != n:
                    pass
                return reply

            if setup is not None:
                call("Page.navigate", url=setup[0])
                while call("Runtime.evaluate", expression="document.readyState")["result"]["result"].get("value") \
                        != "complete":
                    time.sleep(0.05)
                call("Runtime.evaluate", expression=setup[1])
            call("Page.navigate", url=url)
            for wait, action in actions:
                time.sleep(wait)
                call("Runtime.evaluate", expression=action)
            value, end = "", time.monotonic() + timeout
            while time.monotonic() < end and not done(value):
                value = call("Runtime.evaluate", expression=expression)["result"]["result"].get("value", "")
                time.sleep(0.1)
            return value
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(_chromium() is None, reason="no chromium here (scripts/setup.sh --dev installs Debian's)")
def test_the_console_streams_a_clip_live_in_a_real_browser(live, tmp_path):
    """The web console's "stream A live": headless chromium decodes a shipped sample to 16 kHz, streams it over
    the WebSocket with the token as access_token, and renders each provisional result and the final one."""
    url, _ = live
    base = url.replace("ws://", "http://").removesuffix("/v1/verify:stream")
    page = f"{base}/?a=/samples/slt-2.wav&collection=team-a&speaker=slt&run=live"
    expression = "document.getElementById('verdict').textContent + '\\n' + document.getElementById('live-log').textContent"
    text = _page_text(page, expression, lambda v: v.startswith(("final", "INVALID", "UNAUTH", "PERMISSION")),
                      tmp_path / "profile", setup=(f"{base}/", "localStorage.setItem('spkserve.token', 'tok-a')"))
    verdict, *log = text.split("\n")
    assert verdict.startswith("final: ") and " s of speech" in verdict, text
    assert log[0].startswith("so far: ") and any(line.startswith("final: ") for line in log), text


@pytest.mark.skipif(_chromium() is None, reason="no chromium here (scripts/setup.sh --dev installs Debian's)")
def test_the_console_verifies_the_microphone_live_in_a_real_browser(live, tmp_path):
    """"verify the microphone live": chromium's fake capture device plays a recording of the enrolled voice; the
    page streams it for a few seconds, stops, and shows the results and the final verdict."""
    url, _ = live
    base = url.replace("ws://", "http://").removesuffix("/v1/verify:stream")
    wave, rate = sf.read(AUDIO / "flite-slt-2.wav", dtype="int16")
    sf.write(tmp_path / "mic.wav", np.tile(wave, 4), rate)
    expression = "document.getElementById('verdict').textContent + '\\n' + document.getElementById('live-log').textContent"
    click = "document.getElementById('mic').click(), 1"
    text = _page_text(f"{base}/?collection=team-a&speaker=slt", expression,
                      lambda v: v.startswith(("final", "INVALID", "UNAUTH", "PERMISSION", "MICROPHONE")),
                      tmp_path / "profile", setup=(f"{base}/", "localStorage.setItem('spkserve.token', 'tok-a')"),
                      flags=("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                             f"--use-file-for-fake-audio-capture={tmp_path / 'mic.wav'}"),
                      actions=((1.0, click), (6.0, click)))  # start, then stop after about 6 s of "speech"
    verdict, *log = text.split("\n")
    assert verdict.startswith("final: ") and " s of speech" in verdict, text
    assert sum(line.startswith("so far: ") for line in log) >= 2, text


@pytest.mark.parametrize("gone", ["disconnect", "runtime", "oserror"])
def test_a_client_that_leaves_right_after_the_final_result_ends_the_call_normally(gone):
    """The race a real socket rarely loses: the final result is sent, and the client has gone before the server's own
    close (1000) reaches it. The call counts as done (200), not as an error or a disconnect mid-call."""
    import asyncio
    from types import SimpleNamespace

    from starlette.websockets import WebSocketDisconnect

    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service.http_live import verify_stream_socket
    from service.metrics import Metrics

    class Servicer:
        auth = None

        async def VerifyStream(self, requests, context):  # noqa: N802 - the RPC's name
            seen = [r async for r in requests]
            assert seen[0].WhichOneof("part") == "config" and len(seen) == 2
            await context.write(pb.VerifyStreamResponse(final=True, speech_seconds=1.5))

    class LeavingSocket:
        headers, query_params = {}, {}

        def __init__(self):
            self.app = SimpleNamespace(state=SimpleNamespace(server=server))
            self.inbox = [{"type": "websocket.receive", "text": _config(16000)},
                          {"type": "websocket.receive", "bytes": b"\0\0" * 1600},
                          {"type": "websocket.receive", "text": json.dumps({"end": True})}]
            self.sent = []

        async def accept(self, headers=None):
            pass

        async def receive(self):
            return self.inbox.pop(0)

        async def send_text(self, text):
            self.sent.append(json.loads(text))

        async def close(self, code=1000):
            raise {"disconnect": WebSocketDisconnect(1006), "oserror": ConnectionResetError(104, "reset"),
                   "runtime": RuntimeError("Unexpected ASGI message 'websocket.close'")}[gone]

    server = SimpleNamespace(servicer=Servicer(), metrics=Metrics())
    ws = LeavingSocket()
    asyncio.run(verify_stream_socket(ws))
    assert [m["final"] for m in ws.sent] == [True]
    registry = server.metrics.registry
    assert registry.get_sample_value("spkserve_http_requests_total", {"route": "VerifyStream", "status": "200"}) == 1.0
    assert registry.get_sample_value("spkserve_http_requests_total", {"route": "VerifyStream", "status": "499"}) is None
