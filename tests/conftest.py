"""Shared fixtures: tiny exported SSL models, test audio, and real servers on port 0."""

from __future__ import annotations

import asyncio
import io
import os
import random
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "models" / "reference"
REPOSITORY = ROOT / "models" / "repository"

TINY_ENCODER = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
    conv_dim=(32,) * 7, feat_extract_norm="group", num_buckets=32, max_bucket_distance=100,
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
)


_PORTS_GIVEN: set[int] = set()
_PORT_RNG = random.Random()  # its own generator: tests that seed the global one must not pick the same ports


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for port-0 binds and outgoing connections (Linux default 32768-60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A local TCP port free now and outside the kernel's ephemeral range.

    A port taken with bind(0) and released is the very kind the kernel hands to the next port-0 bind (the server's
    own gRPC listener) or outgoing connection, so a test that passes it on as ``http_port`` can lose it in between.
    Ports below the ephemeral range are only ever taken by explicit binds; each is given out once per session.
    """
    low, high = _ephemeral_range()
    span = (10000, low - 1) if low > 11000 else (high + 1, 65535)
    for _ in range(200):
        port = _PORT_RNG.randint(*span)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {span[0]}..{span[1]}")


def wav_bytes(wave: np.ndarray, sr: int = 16000, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    """Encode a waveform as an audio file in memory."""
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="session")
def speech_files() -> dict[str, Path]:
    """The committed reference utterances (real recorded TTS voices)."""
    return {p.stem: p for p in sorted((REFERENCE / "audio").glob("*.wav"))}


def speech_clip(seconds: float, seed: int = 0) -> np.ndarray:
    """A ``seconds`` long stretch of the reference utterances (all of it speech, as VAD sees it)."""
    names = ["flite-slt-1", "flite-awb-1", "flite-rms-1", "flite-kal-1", "espeak-en-1", "flite-slt-2"]
    wave, _ = sf.read(REFERENCE / "audio" / f"{names[seed % len(names)]}.wav", dtype="float32")
    while len(wave) < int(seconds * 16000) + 8000:
        wave = np.concatenate([wave, wave])
    start = 1600 * (seed % 4)  # shortly after the start: speech, not the leading pause
    return wave[start:start + int(seconds * 16000)]


def export_tiny(repo: Path, name: str, family: str = "wavlm", with_lengths: bool = True, seed: int = 0) -> Path:
    """Export a randomly initialised tiny SSL speaker model (GroupNorm front end) into ``repo/name``."""
    import torch

    from models.artifact import ModelCard
    from models.export import export_model
    from models.ssl import SSLSpeakerConfig, build_model

    torch.manual_seed(seed)
    model = build_model(SSLSpeakerConfig(family=family, encoder=dict(TINY_ENCODER), embedding_dim=32)).eval()
    card = ModelCard(
        name=name, version="test", family=family, sample_rate=16000, embedding_dim=32,
        lengths_input="lengths" if with_lengths else None, batching="padded" if with_lengths else "same_length",
        threshold=0.5, min_audio_seconds=0.1, description="tiny random-init test model",
    )
    export_model(model, card, repo / name, int8=False)
    return repo / name


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    """A model repository with the committed ge2e entry and two tiny random SSL models.

    ``SPKSERVE_TEST_MODEL_REPO`` names one built before (``scripts/test_pythons.sh``), so the
    service tests also run where torch is not installed.
    """
    repo = tmp_path_factory.mktemp("repo")
    prebuilt = os.environ.get("SPKSERVE_TEST_MODEL_REPO")
    if prebuilt:
        shutil.copytree(prebuilt, repo, dirs_exist_ok=True)
        return repo
    shutil.copytree(REPOSITORY / "ge2e", repo / "ge2e")
    export_tiny(repo, "tiny-wavlm")
    export_tiny(repo, "tiny-nolen", with_lengths=False)
    return repo


class ServerThread:
    """A real SpeakerServer on its own event loop in a background thread."""

    def __init__(self, config, **kwargs):
        from service.server import SpeakerServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = SpeakerServer(config, **kwargs)
        self.port = self.call(self.server.start())
        self.call(self.server.wait_ready(120))
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 180):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Graceful stop, then end the loop."""
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def ge2e_with(tmp_path: Path, **fields) -> Path:
    """A copy of the shipped ``ge2e`` entry under ``tmp_path`` with ``fields`` of its card replaced (unvalidated)."""
    import json

    entry = tmp_path / "ge2e"
    shutil.copytree(REPOSITORY / "ge2e", entry)
    card = json.loads((entry / "model.json").read_text())
    card.update(fields)
    (entry / "model.json").write_text(json.dumps(card))
    return entry


def make_config(model_repo: Path, data_dir: Path, **overrides):
    """A ServerConfig for tests: ephemeral ports, loopback, the test repository."""
    from service.config import load_config

    # the reference utterances have 1.5-3 s of speech each: tests enroll single ones, so the
    # enrolment minimum is 1 s here (tests/test_speech_rules.py checks the shipped defaults)
    base = dict(host="127.0.0.1", port=0, metrics_port=0, http_port=0, model_repository=str(model_repo), data_dir=str(data_dir),
                default_model="ge2e", max_wait_ms=5.0, intra_op_threads=1, grace_seconds=5.0,
                shutdown_delay_seconds=0.0, min_enroll_speech_seconds=1.0)
    base.update(overrides)
    return load_config(env={}, overrides=base)


@pytest.fixture(scope="module")
def server(model_repo, tmp_path_factory):
    """A running server shared by a test module."""
    srv = ServerThread(make_config(model_repo, tmp_path_factory.mktemp("data")))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    """A SpeakerService client stub connected to ``server``."""
    import grpc

    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 256 << 20)])
    yield pb_grpc.SpeakerServiceStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def mini_corpus(tmp_path_factory):
    """Kaldi-style corpus: 5 recorded voices x 6 noisy crops/gains; 3 train, 2 eval speakers."""
    from training.data.corpus import make_trials

    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    voices = {"slt": ["flite-slt-1", "flite-slt-2"], "awb": ["flite-awb-1"], "rms": ["flite-rms-1"],
              "kal": ["flite-kal-1"], "esp": ["espeak-en-1"]}
    split_of = {"slt": "train", "awb": "train", "rms": "train", "kal": "eval", "esp": "eval"}
    rows = {"train": [], "eval": []}
    for spk, files in voices.items():
        for i in range(6):
            wave, _ = sf.read(REFERENCE / "audio" / f"{files[i % len(files)]}.wav", dtype="float32")
            start = int(rng.integers(0, max(1, len(wave) - 16000)))
            seg = wave[start:start + 24000] * rng.uniform(0.5, 1.0) + rng.standard_normal(min(24000, len(wave) - start)) * 0.003
            path = root / "wav" / f"{spk}-{i}.wav"
            path.parent.mkdir(exist_ok=True)
            sf.write(path, seg.astype(np.float32), 16000)
            rows[split_of[spk]].append((f"{spk}-{i}", spk, path))
    for split, rs in rows.items():
        d = root / split
        d.mkdir()
        (d / "wav.scp").write_text("".join(f"{u} {p}\n" for u, _, p in rs))
        (d / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s, _ in rs))
    trials = make_trials(rows["eval"], 3, 6, 0)
    (root / "eval" / "trials").write_text("".join(f"{a} {b} {'target' if t else 'nontarget'}\n" for a, b, t in trials))
    return root


@pytest.fixture(scope="session")
def mini_real(mini_corpus, tmp_path_factory):
    """The real-speech pool's layout on the mini corpus' recordings: calibration (3 speakers), evaluation (2)."""
    import random

    from training.data.realspeech import make_trials

    root = tmp_path_factory.mktemp("real")
    for split, src in (("calibration", "train"), ("evaluation", "eval")):
        d = root / split
        d.mkdir()
        for name in ("wav.scp", "utt2spk"):
            (d / name).write_text((mini_corpus / src / name).read_text())
        u2s = dict(line.split() for line in (d / "utt2spk").read_text().splitlines())
        trials = make_trials(u2s, set(), random.Random(0), max_targets=50, nontargets_per_utt=8)
        (d / "trials").write_text("".join(f"{a} {b} {t}\n" for a, b, t in trials))
    return root


def wait_for_sample(registry, name: str, labels: dict, want: float, timeout: float = 10.0) -> float | None:
    """Poll a Prometheus sample until it equals ``want`` or ``timeout`` passes; its last value (None: absent)."""
    import time

    end = time.monotonic() + timeout
    while (value := registry.get_sample_value(name, labels)) != want and time.monotonic() < end:
        time.sleep(0.05)
    return value
