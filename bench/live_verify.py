"""Live verification (VerifyStream) on real speech, through a real server: accuracy and load.

    .venv/bin/python bench/live_verify.py accuracy --real corpus-real --split evaluation [--trials 600] [--switches 200]
    .venv/bin/python bench/live_verify.py load [--streams 100] [--seconds 30] [--chunk-ms 500] [--real corpus-real] [--repeat 3]

``accuracy`` (human speech from the real-speech pool; one server, ge2e, default options unless
``--change-llr`` / ``--reference-llr`` / ``--window`` say otherwise):

- *final = Verify*: trials of the split's ``trials`` file (targets and non-targets alike); the
  reference is utterance a (audio), the stream is utterance b sent as 16-bit PCM in 500 ms
  chunks, through a channel drawn per trial (clean, telephone band at 8 kHz, noise at 15 dB);
  the final verdict is compared with ``Verify(a, b)`` on the same audio.
- *speaker change*: streams of one speaker's utterances (8-15 s of audio) followed by another's
  (8 s or more), same channel draw; detected when a change is flagged within 3 s after the
  switch (an earlier flag is a false alert); single-speaker streams (20-30 s of one speaker):
  false alert when any change is flagged. ``--trace`` records every interim's ``recent_llr`` and
  ``recent_reference_llr`` (server run with alerts off) to choose ``live_change_llr`` and
  ``live_change_reference_llr`` offline on the calibration split.

``load``: ``--streams`` concurrent streams at real-time pace (a chunk every ``--chunk-ms``),
each 0.75-1.25 x ``--seconds`` long and starting within the first 5 s, of speech with pauses
(the real pool's human recordings with ``--real``, else the shipped synthetic clips), each claiming a
speaker enrolled before the run (``--reference audio``: reference audio in the config instead,
embedded as its stream starts), optionally beside other traffic (``--background N``: N clients
sending ``Embed`` requests of a minute of speech back to back); reports the interim latency (time
from sending the chunk that completes the speech an interim covers to receiving it: p50, p95)
and the CPU the server used; ``--repeat`` runs it several times on one server and prints the medians;
``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_embed import Server  # noqa: E402

SR = 16000
CHANNELS = ("clean", "telephone", "noise15")


def load_split(d: Path) -> tuple[dict[str, np.ndarray], dict[str, str], list[tuple[str, str, bool]]]:
    """(utterance -> 16 kHz wave, utterance -> speaker, trials) of a Kaldi-style split."""
    from models.audio import resample, to_mono

    scp = dict(ln.split(maxsplit=1) for ln in (d / "wav.scp").read_text().splitlines() if ln.strip())
    u2s = dict(ln.split() for ln in (d / "utt2spk").read_text().splitlines() if ln.strip())
    waves = {}
    for u, path in scp.items():
        x, sr = sf.read(path.strip(), dtype="float32", always_2d=True)
        waves[u] = resample(to_mono(x), sr, SR)
    trials = [(a, b, t == "target") for a, b, t in (ln.split() for ln in (d / "trials").read_text().splitlines() if ln.strip())]
    return waves, u2s, trials


def channel(x: np.ndarray, name: str, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(samples, rate) of a 16 kHz wave through a channel: clean, telephone (8 kHz mu-law band), noise at 15 dB."""
    if name == "telephone":
        from training.data.channels import apply_condition

        return apply_condition("telephone", x, rng)
    if name == "noise15":
        noise = rng.standard_normal(len(x)).astype(np.float32)
        p = float(np.mean(x ** 2)) or 1e-8
        return (x + noise * np.float32(np.sqrt(p / 10 ** 1.5))).astype(np.float32), SR
    return x, SR


def pcm16(x: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as little-endian 16-bit PCM bytes."""
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def wav(x: np.ndarray, rate: int) -> bytes:
    """Float samples as a 16-bit WAV file's bytes."""
    import io

    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def stream(stub, pb, ref_audio, x: np.ndarray, rate: int, chunk_ms: float = 500, realtime: bool = False,
                 sent_at: list | None = None, interim_seconds: float = 0.0) -> list:
    """Results of one VerifyStream of (x, rate) as PCM chunks (``sent_at``: (stream seconds, time) per chunk)."""
    data = pcm16(x)
    step = int(rate * chunk_ms / 1000) * 2

    async def messages():
        yield pb.VerifyStreamRequest(config=pb.VerifyStreamConfig(
            reference=ref_audio, pcm=pb.PcmFormat(sample_rate=rate, encoding=pb.PCM_S16LE), interim_seconds=interim_seconds))
        t0 = time.monotonic()
        for i in range(0, len(data), step):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + i / 2 / rate - time.monotonic()))
            if sent_at is not None:
                sent_at.append(((i + step) / 2 / rate, time.monotonic()))
            yield pb.VerifyStreamRequest(chunk=data[i:i + step])

    out = []
    async for r in stub.VerifyStream(messages(), timeout=600):
        out.append((time.monotonic(), r))
    return out


async def retrying(make, attempts: int = 20):
    """Await ``make()``, retrying on RESOURCE_EXHAUSTED after the pause the server asks for (a polite client)."""
    import grpc

    for i in range(attempts):
        try:
            return await make()
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or i == attempts - 1:
                raise
            await asyncio.sleep(1.0 + 0.5 * i)


async def accuracy(target: str, waves, u2s, trials, n_trials: int, n_switch: int, seed: int, trace: bool,
                   interim_seconds: float = 0.0) -> dict:
    """Final-verdict agreement with Verify and speaker-change detection over real-speech trials and streams."""
    import grpc

    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    by_spk: dict[str, list[str]] = {}
    for u, s in sorted(u2s.items()):
        by_spk.setdefault(s, []).append(u)
    speakers = sorted(by_spk)
    sem = asyncio.Semaphore(8)
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.SpeakerServiceStub(ch)

        async def one_trial(a: str, b: str, ch_name: str, r: np.random.Generator):
            xb, rate = channel(waves[b], ch_name, r)
            ref = pb.Probe(audio=pb.Audio(encoded=wav(waves[a], SR)))
            async with sem:
                results = await retrying(lambda: stream(stub, pb, ref, xb, rate, interim_seconds=interim_seconds))
                v = await retrying(lambda: stub.Verify(pb.VerifyRequest(a=ref, b=pb.Probe(audio=pb.Audio(encoded=wav(xb, rate))))))
            final = results[-1][1]
            last = [r for _, r in results[:-1] if r.HasField("llr")]
            return dict(trial=(a, b), channel=ch_name, final=int(final.verdict), verify=int(v.verdict),
                        last_interim_llr=last[-1].llr if last else None, final_score=final.score,
                        last_interim_score=last[-1].score if last else None, final_threshold=final.threshold,
                        speech=(final.speech_seconds, last[-1].speech_seconds if last else 0.0),
                        final_llr=final.llr if final.HasField("llr") else None, verify_llr=v.llr if v.HasField("llr") else None)

        picks = rng.choice(len(trials), size=min(n_trials, len(trials)), replace=False)
        jobs = [one_trial(trials[i][0], trials[i][1], str(rng.choice(CHANNELS)), np.random.default_rng([seed, int(i)]))
                for i in picks]
        trial_rows = await asyncio.gather(*jobs)

        def concat(spk: str, seconds: float, r: np.random.Generator) -> np.ndarray:
            utts, parts, total = list(r.permutation(by_spk[spk])), [], 0
            while total < seconds * SR:
                parts.append(waves[utts[len(parts) % len(utts)]])
                total += len(parts[-1])
            return np.concatenate(parts)

        async def one_stream(kind: str, i: int):
            r = np.random.default_rng([seed, 7, i])
            a, b = r.choice(speakers, size=2, replace=False)
            ch_name = str(r.choice(CHANNELS))
            if kind == "switch":
                xa, xb = concat(a, r.uniform(8, 15), r), concat(b, 8, r)
                x, switch = np.concatenate([xa, xb]), len(xa) / SR
            else:
                x, switch = concat(a, r.uniform(20, 30), r), None
            x, rate = channel(x, ch_name, r)
            ref = pb.Probe(audio=pb.Audio(encoded=wav(waves[by_spk[a][0]], SR)))
            async with sem:
                results = await retrying(lambda: stream(stub, pb, ref, x, rate, interim_seconds=interim_seconds))
            final = results[-1][1]
            trace_rows = [(res.audio_seconds, res.recent_llr,
                           res.recent_reference_llr if res.HasField("recent_reference_llr") else None)
                          for _, res in results if not res.final and res.HasField("recent_llr")]
            return dict(kind=kind, speakers=(str(a), str(b)), channel=ch_name, switch=switch,
                        seconds=len(x) / rate, changes=list(final.change_seconds), trace=trace_rows if trace else None)

        stream_rows = await asyncio.gather(*[one_stream("switch", i) for i in range(n_switch)],
                                           *[one_stream("single", n_switch + i) for i in range(n_switch)])
    return summarize(trial_rows, stream_rows)


def first_alert(trace: list[tuple[float, float, float | None]], threshold: float,
                reference_threshold: float = 50.0) -> float | None:
    """The first stream position whose recent_llr is below ``threshold`` and whose recent_reference_llr is below
    ``reference_threshold`` (what the server with those options flags first)."""
    for pos, llr, ref_llr in trace:
        if llr < threshold and (ref_llr is None or ref_llr < reference_threshold):
            return pos
    return None


def change_figures(rows: list[dict], alerts) -> dict:
    """Detection within 3 s and false alerts, from each stream's alert positions ``alerts(row)``."""
    sw = [r for r in rows if r["kind"] == "switch"]
    single = [r for r in rows if r["kind"] == "single"]
    detected = early = 0
    delays = []
    for r in sw:
        first = alerts(r)
        if first is not None and first < r["switch"]:
            early += 1
        elif first is not None and first <= r["switch"] + 3.0:
            detected += 1
            delays.append(first - r["switch"])
    false = sum(alerts(r) is not None for r in single)
    return dict(switches=len(sw), detected_within_3s=detected / max(len(sw), 1), flagged_before_switch=early / max(len(sw), 1),
                median_delay_s=statistics.median(delays) if delays else None, single=len(single),
                false_alert_rate=false / max(len(single), 1))


def summarize(trial_rows: list[dict], stream_rows: list[dict]) -> dict:
    """The accuracy table's figures from the per-trial and per-stream rows."""
    agree = [r["final"] == r["verify"] for r in trial_rows]
    by_channel = {c: float(np.mean([a for a, r in zip(agree, trial_rows) if r["channel"] == c]))
                  for c in CHANNELS if any(r["channel"] == c for r in trial_rows)}
    diffs = [abs(r["final_llr"] - r["verify_llr"]) for r in trial_rows
             if r["final_llr"] is not None and r["verify_llr"] is not None]
    out = dict(trials=len(trial_rows), final_equals_verify=float(np.mean(agree)) if agree else None,
               by_channel=by_channel, median_abs_llr_diff=statistics.median(diffs) if diffs else None,
               changes=change_figures(stream_rows, lambda r: r["changes"][0] if r["changes"] else None))
    if stream_rows and stream_rows[0]["trace"] is not None:
        out["threshold_sweep"] = {  # "live_change_llr,live_change_reference_llr"
            f"{t:g},{rt:g}": change_figures(stream_rows, lambda r, t=t, rt=rt: first_alert(r["trace"], t, rt))
            for t in (3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0) for rt in (50.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0)}
    out["rows"] = dict(trials=trial_rows, streams=stream_rows)
    return out


def reference_clips() -> list[np.ndarray]:
    """The shipped reference clips (synthetic voices, 16 kHz): the load's speech when no real pool is given."""
    from tests.conftest import REFERENCE

    return [sf.read(p, dtype="float32")[0] for p in sorted((REFERENCE / "audio").glob("*.wav"))]


async def load(target: str, streams: int, seconds: float, chunk_ms: float, interim_seconds: float = 0.0,
               clips: list[np.ndarray] | None = None, seed: int = 0, enrolled: bool = True,
               background: int = 0, background_seconds: float = 60.0) -> dict:
    """Interim latency of ``streams`` concurrent real-time streams of ``clips`` (16 kHz waves) with pauses.

    ``enrolled``: stream i claims speaker ``ref-i`` of collection ``live-load``, enrolled (untimed) from one clip
    before the streams start; else its config carries that clip as audio, embedded when the stream starts.
    ``background``: that many clients send ``Embed`` requests of ``background_seconds`` of speech one after
    another while the streams run (other traffic on the same server)."""
    import grpc

    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    clips = clips or reference_clips()
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.SpeakerServiceStub(ch)
        refs = [clips[i % len(clips)] for i in range(streams)]
        if enrolled:
            gate = asyncio.Semaphore(8)

            async def enroll(i: int):
                async with gate:
                    for k in range(len(clips)):  # a clip the VAD finds no speech in is refused: take the next
                        refs[i] = clips[(i + k) % len(clips)]
                        try:
                            return await retrying(lambda: stub.Enroll(pb.EnrollRequest(
                                collection="live-load", speaker_id=f"ref-{i}", allow_reenroll=True,
                                audio=[pb.Audio(encoded=wav(refs[i], SR))]), timeout=120))
                        except grpc.aio.AioRpcError as e:
                            if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                                raise
                    raise RuntimeError(f"ref-{i}: the server refused every clip for enrollment")

            await asyncio.gather(*[enroll(i) for i in range(streams)])

        async def one(i: int):
            parts, total = [], 0
            while total < seconds * SR:  # speech with pauses, as a caller talks
                parts += [clips[int(rng.integers(len(clips)))], np.zeros(int(rng.uniform(0.2, 1.0) * SR), np.float32)]
                total += len(parts[-2]) + len(parts[-1])
            x = np.concatenate(parts)[:int(seconds * rng.uniform(0.75, 1.25) * SR)]  # calls of different lengths
            ref = (pb.Probe(speaker=pb.SpeakerRef(collection="live-load", speaker_id=f"ref-{i}")) if enrolled
                   else pb.Probe(audio=pb.Audio(encoded=wav(refs[i], SR))))
            await asyncio.sleep(rng.uniform(0, 5.0))  # calls do not start (or end) in lockstep
            sent: list = []
            results = await stream(stub, pb, ref, x, SR, chunk_ms, realtime=True, sent_at=sent,
                                   interim_seconds=interim_seconds)
            for t_recv, r in results:
                if r.final:
                    continue
                covered = [t for pos, t in sent if pos >= r.audio_seconds - 1e-6]  # the chunk completing it
                if covered:
                    latencies.append(t_recv - covered[0])

        done = asyncio.Event()
        embeds: list[float] = []  # seconds per background Embed

        async def other(j: int):
            r = np.random.default_rng(1000 + seed * 100 + j)
            parts, total = [], 0
            while total < background_seconds * SR:
                parts.append(clips[int(r.integers(len(clips)))])
                total += len(parts[-1])
            body = pb.EmbedRequest(audio=pb.Audio(encoded=wav(np.concatenate(parts)[:int(background_seconds * SR)], SR)))
            while not done.is_set():
                t = time.monotonic()
                await retrying(lambda: stub.Embed(body, timeout=120))
                embeds.append(time.monotonic() - t)

        t0, c0 = time.monotonic(), time.process_time()
        others = [asyncio.ensure_future(other(j)) for j in range(background)]
        await asyncio.gather(*[one(i) for i in range(streams)])
        wall = time.monotonic() - t0
        done.set()
        await asyncio.gather(*others)
    lat = np.array(latencies)
    return dict(streams=streams, seconds=seconds, chunk_ms=chunk_ms, interim_seconds=interim_seconds or 1.0,
                wall_s=wall, interims=len(lat),
                p50_ms=float(np.percentile(lat, 50) * 1000), p95_ms=float(np.percentile(lat, 95) * 1000),
                p99_ms=float(np.percentile(lat, 99) * 1000), client_cpu_s=time.process_time() - c0,
                background_embeds=len(embeds), background_p50_s=float(np.median(embeds)) if embeds else 0.0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    """Command line: the accuracy or the load benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--real", type=Path, required=True)
    a.add_argument("--split", default="evaluation")
    a.add_argument("--trials", type=int, default=600)
    a.add_argument("--switches", type=int, default=200)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--change-llr", type=float, default=None, help="server option live_change_llr")
    a.add_argument("--reference-llr", type=float, default=None, help="server option live_change_reference_llr")
    a.add_argument("--window", type=float, default=None, help="server option live_change_window_seconds")
    a.add_argument("--interim-seconds", type=float, default=0.0, help="config.interim_seconds (0: the default, 1 s)")
    a.add_argument("--trace", action="store_true", help="alerts off; sweep both thresholds offline on recent_llr and recent_reference_llr")
    lo = sub.add_parser("load")
    lo.add_argument("--streams", type=int, default=100)
    lo.add_argument("--seconds", type=float, default=30)
    lo.add_argument("--chunk-ms", type=float, default=500)
    lo.add_argument("--interim-seconds", type=float, default=0.0, help="config.interim_seconds (0: the default, 1 s)")
    lo.add_argument("--real", type=Path, help="real-speech pool: the calls are its split's human recordings "
                    "(default: the shipped synthetic reference clips)")
    lo.add_argument("--split", default="evaluation")
    lo.add_argument("--reference", choices=("enrolled", "audio"), default="enrolled",
                    help="who each call claims to be: a speaker enrolled beforehand (collection + speaker_id, as a "
                         "call centre verifies) or audio sent in the config and embedded when the stream starts")
    lo.add_argument("--background", type=int, default=0,
                    help="clients sending Embed requests of --background-seconds of speech back to back meanwhile")
    lo.add_argument("--background-seconds", type=float, default=60.0)
    lo.add_argument("--repeat", type=int, default=1, help="runs on the same server; prints each and the medians")
    for p in (a, lo):
        p.add_argument("--repository", type=Path, default=ROOT / "models" / "repository")
        p.add_argument("--threads", type=int, default=0,
                       help="ONNX Runtime threads per batch (0: the server's default, one per inference worker on CPU)")
        p.add_argument("--json", type=Path)
    args = ap.parse_args()
    opts = dict(models="ge2e")
    if args.cmd == "accuracy":
        if args.trace:
            opts["live_change_llr"] = -50
        elif args.change_llr is not None:
            opts["live_change_llr"] = args.change_llr
        if args.reference_llr is not None and not args.trace:
            opts["live_change_reference_llr"] = args.reference_llr
        if args.window is not None:
            opts["live_change_window_seconds"] = args.window
    server = Server(args.repository, args.threads or None, **opts)
    try:
        if args.cmd == "accuracy":
            waves, u2s, trials = load_split(args.real / args.split)
            out = asyncio.run(accuracy(server.target, waves, u2s, trials, args.trials, args.switches, args.seed, args.trace,
                                       args.interim_seconds))
            rows = out.pop("rows")
            print(json.dumps(out, indent=1))
            if args.json:
                args.json.write_text(json.dumps({**out, "rows": rows}, indent=1, default=str))
        else:
            clips = list(load_split(args.real / args.split)[0].values()) if args.real else None
            runs = []
            for k in range(args.repeat):
                c0 = cpu_seconds(server.p.pid)
                run = asyncio.run(load(server.target, args.streams, args.seconds, args.chunk_ms, args.interim_seconds,
                                       clips, seed=k, enrolled=args.reference == "enrolled",
                                       background=args.background, background_seconds=args.background_seconds))
                run["server_cpu_cores"] = (cpu_seconds(server.p.pid) - c0) / run["wall_s"]
                runs.append(run)
                print(json.dumps(run), flush=True)
            out = {**{k: statistics.median(r[k] for r in runs) for k in runs[0]},
                   "speech": "real" if args.real else "synthetic", "runs": len(runs)}
            print(json.dumps(out, indent=1))
            if args.json:
                args.json.write_text(json.dumps(out, indent=1))
    finally:
        server.close()


if __name__ == "__main__":
    main()
