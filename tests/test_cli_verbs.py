"""The ``spkserve`` client verbs: one for every RPC, against a real server, with friendly errors."""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from tests.conftest import REFERENCE
from tests.test_band_match import _clip, _landline

AUDIO = REFERENCE / "audio"


def _run(capsys, *argv: str) -> tuple[int, list[dict], str]:
    from service.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, [json.loads(line) for line in out.out.splitlines() if line.startswith("{")], out.err


def test_every_rpc_has_a_verb():
    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service.cli import build_parser
    from service.cli_client import VERBS

    by_rpc = {"Embed": "embed", "EmbedStream": "embed", "Verify": "verify", "Compare": "compare", "Enroll": "enroll",
              "Identify": "identify", "DeleteSpeaker": "delete", "GetSpeaker": "get-speaker",
              "ListSpeakers": "list-speakers", "ListCollections": "list-collections", "ListModels": "models",
              "DeleteCollection": "delete-collection", "UpdateSpeaker": "update-speaker",
              "GetModelInfo": "model-info", "LoadModel": "load-model", "UnloadModel": "unload-model",
              "MigrateCollection": "migrate", "Diarize": "diarize", "DiarizeStream": "diarize",
              "VerifyStream": "verify-stream"}
    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["SpeakerService"].methods}
    assert rpcs == set(by_rpc), rpcs ^ set(by_rpc)  # a new RPC needs a verb (and this table)
    parser_verbs = set(build_parser()._subparsers._group_actions[0].choices)
    assert set(by_rpc.values()) <= set(VERBS) <= parser_verbs


def test_records_compare_and_verify_against_an_enrolled_speaker(server, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPKSERVE_TARGET", server.target)  # no --target: the environment's
    slt1, slt2, awb = (str(AUDIO / f"{n}.wav") for n in ("flite-slt-1", "flite-slt-2", "flite-awb-1"))
    code, out, _ = _run(capsys, "enroll", "--collection", "cli", "--speaker", "slt", slt1)
    assert code == 0 and out[0]["created"]
    assert _run(capsys, "enroll", "--collection", "cli", "--speaker", "awb", awb)[0] == 0
    code, out, _ = _run(capsys, "get-speaker", "--collection", "cli", "--speaker", "slt", "--include-voiceprint")
    assert code == 0 and out[0]["speaker"] == "slt" and len(out[0]["voiceprint"]) == 256
    code, out, _ = _run(capsys, "list-speakers", "--collection", "cli", "--page-size", "1")
    assert len(out[0]["speakers"]) == 1 and out[0]["next_page_token"] and out[0]["total_size"] == 2
    code, out, _ = _run(capsys, "list-speakers", "--collection", "cli", "--page-size", "1", "--all")
    assert {s["speaker"] for s in out[0]["speakers"]} == {"slt", "awb"} and out[0]["next_page_token"] is None
    code, out, _ = _run(capsys, "list-collections")
    assert {"name": "cli", "speaker_count": 2}.items() <= next(c for c in out[0]["collections"] if c["name"] == "cli").items()
    same = _run(capsys, "verify", "--collection", "cli", "--speaker", "slt", slt2)[1][0]
    other = _run(capsys, "verify", "--collection", "cli", "--speaker", "awb", slt2)[1][0]
    assert same["score"] > other["score"]
    # only the audio side has VAD figures: the enrolled speaker's side is null, not "0 s of speech"
    assert same["speech_seconds"][0] is None and same["speech_seconds"][1] > 1.0 and same["narrowband"] == [None, False]
    assert not same["band_matched"]
    # a landline call against the wideband enrolment: verify and identify say it was scored in the call's band
    call = tmp_path / "call.wav"
    sf.write(call, _landline(_clip("flite-slt-2")), 8000)
    on_call = _run(capsys, "verify", "--collection", "cli", "--speaker", "slt", str(call))[1][0]
    assert on_call["band_matched"] and on_call["narrowband"] == [None, True]
    found = _run(capsys, "identify", "--collection", "cli", str(call))[1][0]
    assert found["band_matched"] and found["candidates"][0]["speaker"] == "slt"
    # compare: the embeddings `spkserve embed` printed (plain and streamed give the same vectors)
    code, plain, _ = _run(capsys, "embed", slt1, slt2)
    code, streamed, _ = _run(capsys, "embed", "--stream", slt1)
    assert streamed[0]["embedding"] == pytest.approx(plain[0]["embedding"], abs=1e-5)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(o) for o in plain) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(plain[1]) + "\n")
    code, out, _ = _run(capsys, "compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))
    assert code == 0 and out[0]["rows"] == 2 and out[0]["cols"] == 1 and out[0]["scores"][1][0] == pytest.approx(1.0, abs=1e-4)
    (tmp_path / "bad.jsonl").write_text("hello\n")
    with pytest.raises(SystemExit, match="line 1: not a `spkserve embed` JSON line"):
        _run(capsys, "compare", str(tmp_path / "bad.jsonl"), str(tmp_path / "b.jsonl"))
    code, out, _ = _run(capsys, "model-info")
    assert code == 0 and out[0]["name"] == "ge2e" and out[0]["embedding_dim"] == 256
    assert out[0]["input_level_dbfs"] == -25.0  # the card's level, as the server reports it
    low, high = out[0]["input_tilt_db_per_octave"]  # the card's tilt range
    assert low < 0 < high
    assert out[0]["remove_mains_hum"] is True  # the card's hum step, as the server reports it
    code, out, err = _run(capsys, "migrate", "--collection", "cli", "--to", "cli2")
    assert code == 1 and err.startswith("PERMISSION_DENIED")  # admin only (model_control is off)
    with pytest.raises(SystemExit, match="give one FILE"):
        _run(capsys, "verify", "--speaker", "slt", slt1, slt2)


def test_friendly_errors(server, capsys, tmp_path, monkeypatch):
    import service.cli_io as cli_io

    code, _, err = _run(capsys, "models", "--target", "127.0.0.1:1", "--timeout", "5")
    assert code == 1 and "cannot reach 127.0.0.1:1: is `spkserve serve` running?" in err
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (17 << 20))  # over the server's 16 MiB message limit
    code, _, err = _run(capsys, "verify", "--target", server.target, str(big), str(big))
    assert code == 1 and err.startswith("INVALID_ARGUMENT: chunk")  # streamed (EmbedStream), then found not audio
    monkeypatch.setattr(cli_io, "STREAM_ABOVE_BYTES", 64 << 20)  # as if sent in one message: the server's limit
    code, _, err = _run(capsys, "verify", "--target", server.target, str(big), str(big))
    assert code == 1 and err.startswith("RESOURCE_EXHAUSTED") and "max_message_mb" in err and "EmbedStream" in err
    mp4 = tmp_path / "clip.m4a"
    mp4.write_bytes(b"\0\0\0\x18ftypM4A " + b"\0" * 4000)
    code, _, err = _run(capsys, "embed", "--target", server.target, str(mp4))
    assert code == 1 and err.startswith("INVALID_ARGUMENT") and "WAV, FLAC" in err and "ffmpeg" in err
    with pytest.raises(SystemExit, match="cannot read"):
        _run(capsys, "embed", "--target", server.target, str(tmp_path / "missing.wav"))


def test_every_request_field_a_user_sets_has_an_option(server, capsys, tmp_path, monkeypatch):
    """enroll --embeddings/--metadata, identify --threshold/--min-score, verify-stream --target-far and
    diarize --embeddings reach the server (each was an RPC field the command line could not set)."""
    monkeypatch.setenv("SPKSERVE_TARGET", server.target)
    slt1, slt2, awb = (str(AUDIO / f"{n}.wav") for n in ("flite-slt-1", "flite-slt-2", "flite-awb-1"))
    code, lines, _ = _run(capsys, "embed", slt2)
    (tmp_path / "slt.jsonl").write_text(json.dumps(lines[0]) + "\n")
    code, out, _ = _run(capsys, "enroll", "--collection", "opts", "--speaker", "slt", "--embeddings",
                        str(tmp_path / "slt.jsonl"), "--metadata", "team=blue", "--metadata", "note=a=b", slt1)
    assert code == 0 and out[0]["utterance_count"] == 2 and out[0]["metadata"] == {"team": "blue", "note": "a=b"}
    assert [u["file"] for u in out[0]["utterances"]] == [slt1, f"{tmp_path / 'slt.jsonl'} line 1"]
    assert out[0]["speech_seconds"] == pytest.approx(out[0]["utterances"][0]["speech_seconds"] + lines[0]["speech_seconds"])
    # embeddings carry the model that made them: another model's (same size, other space) are not enrolled
    (tmp_path / "other.jsonl").write_text(json.dumps({**lines[0], "model": "other-model"}) + "\n")
    code, _, err = _run(capsys, "enroll", "--collection", "opts", "--speaker", "slt", "--embeddings",
                        str(tmp_path / "other.jsonl"))
    assert code == 1 and "other-model" in err
    with pytest.raises(SystemExit, match="made by model 'other-model', not --model 'ge2e'"):
        _run(capsys, "enroll", "--collection", "opts", "--speaker", "slt", "--model", "ge2e", "--embeddings",
             str(tmp_path / "other.jsonl"))
    with pytest.raises(SystemExit, match="embeddings of different models cannot be compared: 'ge2e'"):
        _run(capsys, "compare", str(tmp_path / "slt.jsonl"), str(tmp_path / "other.jsonl"))
    with pytest.raises(SystemExit, match="--metadata must be KEY=VALUE, got 'team'"):
        _run(capsys, "enroll", "--collection", "opts", "--speaker", "x", "--metadata", "team", slt1)
    with pytest.raises(SystemExit, match="give audio FILEs, --embeddings FILE, or both"):
        _run(capsys, "enroll", "--collection", "opts", "--speaker", "x")
    code, out, _ = _run(capsys, "identify", "--collection", "opts", "--threshold", "0.99", awb)
    assert code == 0 and out[0]["threshold"] == pytest.approx(0.99) and not out[0]["is_match"]
    assert set(out[0]["candidates"][0]) == {"speaker", "score"}  # the candidates' fields stay exactly these
    code, got, _ = _run(capsys, "get-speaker", "--collection", "opts", "--speaker", "slt")
    assert got[0]["metadata"] == {"team": "blue", "note": "a=b"}
    code, out, _ = _run(capsys, "identify", "--collection", "opts", "--min-score", "0.99", awb)
    assert code == 0 and out[0]["candidates"] == []  # below the floor: left out
    code, out, err = _run(capsys, "identify", "--collection", "opts", "--threshold", "0.5", "--target-far", "0.01", awb)
    assert code == 1 and "target_false_accept_rate" in err
    code, out, err = _run(capsys, "verify-stream", "--collection", "opts", "--speaker", "slt", "--target-far", "7", slt2)
    assert code == 1 and err.startswith("INVALID_ARGUMENT: ") and "target_false_accept_rate" in err
    code, out, _ = _run(capsys, "diarize", "--format", "json", "--embeddings", slt1)
    assert code == 0 and len(out[0]["speakers"][0]["embedding"]) == 256
    with pytest.raises(SystemExit, match="--embeddings needs --format json"):
        _run(capsys, "diarize", "--embeddings", slt1)


def test_files_too_large_for_one_message_go_through_embed_stream(server, capsys, monkeypatch):
    """verify / identify / enroll send a file over the one-message size as its EmbedStream embedding (with its model
    and speech), so long recordings work beyond max_message_mb; the printed speech is the stream's."""
    import service.cli_io as cli_io

    monkeypatch.setenv("SPKSERVE_TARGET", server.target)
    slt1, slt2, awb = (str(AUDIO / f"{n}.wav") for n in ("flite-slt-1", "flite-slt-2", "flite-awb-1"))
    _, small, _ = _run(capsys, "verify", slt1, slt2)
    code, (enrolled,), _ = _run(capsys, "enroll", "--collection", "big", "--speaker", "slt", slt1)
    monkeypatch.setattr(cli_io, "STREAM_ABOVE_BYTES", 1000)  # every file is "large" now

    def streams() -> float:
        return server.server.metrics.registry.get_sample_value(
            "spkserve_grpc_requests_total", {"code": "OK", "method": "EmbedStream"}) or 0.0

    before = streams()
    code, (big,), _ = _run(capsys, "verify", slt1, slt2)
    assert code == 0 and streams() == before + 2 and big["verdict"] == small[0]["verdict"]
    assert big["score"] == pytest.approx(small[0]["score"], abs=1e-4) and big["speech_seconds"] == small[0]["speech_seconds"]
    code, (against,), _ = _run(capsys, "verify", "--collection", "big", "--speaker", "slt", slt2)
    assert code == 0 and against["speech_seconds"][0] is None and against["speech_seconds"][1] == small[0]["speech_seconds"][1]
    code, (found,), _ = _run(capsys, "identify", "--collection", "big", slt2)
    assert code == 0 and found["candidates"][0]["speaker"] == "slt" and found["speech_seconds"] > 1
    code, (more,), _ = _run(capsys, "enroll", "--collection", "big", "--speaker", "slt", slt2)
    assert code == 0 and more["utterance_count"] == 2 and [u["file"] for u in more["utterances"]] == [slt2]
    assert more["speech_seconds"] == pytest.approx(enrolled["speech_seconds"] + small[0]["speech_seconds"][1], abs=1e-3)
    assert streams() == before + 5  # every file went through EmbedStream


@pytest.mark.parametrize("argv, message", [
    (["model-info", "--model", "nope"], "unrecognized arguments: --model"),  # was: the default model, silently
    (["models", "--model", "x"], "unrecognized arguments: --model"),
    (["embed", "--timeout", "0", "a.wav"], "argument --timeout: must be more than 0"),  # was: DEADLINE_EXCEEDED
    (["embed", "--timeout", "nan", "a.wav"], "argument --timeout: must be more than 0"),
    (["embed", "--timeout", "inf", "a.wav"], "at most 1e+09 seconds, got inf"),
    (["embed", "--timeout", "soon", "a.wav"], "argument --timeout: must be a number of seconds, got 'soon'"),
    (["models", "--target", "localhost:99999"], "argument --target: port must be in 1..65535, got 99999"),
])
def test_options_a_command_cannot_honour_are_refused_before_any_call(capsys, argv, message):
    """A usage error (status 2) naming the option, instead of an option ignored or a call that cannot succeed."""
    from service.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_version(capsys):
    from service import package_version
    from service.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"spkserve {package_version()}"


def test_the_default_deadline_is_60_s_and_none_for_stdin():
    from service.cli import build_parser
    from service.cli_client import call_options

    parser = build_parser()
    assert call_options(parser.parse_args(["embed", "a.wav"]))["timeout"] == 60.0
    assert call_options(parser.parse_args(["embed", "a.wav", "-"]))["timeout"] is None
    assert call_options(parser.parse_args(["verify-stream", "--collection", "c", "--speaker", "s", "-"]))["timeout"] is None
    assert call_options(parser.parse_args(["diarize", "--timeout", "9", "-"]))["timeout"] == 9.0
    assert call_options(parser.parse_args(["models", "--token", "t"]))["metadata"] == [("authorization", "Bearer t")]


def test_the_target_port_and_model_options_where_they_belong():
    """HOST:PORT targets and unix sockets pass; --model exists exactly on the verbs whose RPC takes a model."""
    from service.cli import build_parser

    parser = build_parser()
    for target in ("localhost:50051", "[::1]:50051", "dns:///svc.local:443", "unix:/run/spk.sock", "host"):
        assert parser.parse_args(["models", "--target", target]).target == target
    verbs = parser._subparsers._group_actions[0].choices
    with_model = {v for v, p in verbs.items() if any("--model" in a.option_strings for a in p._actions)}
    assert with_model == {"embed", "verify", "verify-stream", "enroll", "identify", "migrate", "diarize"}


def test_a_reader_that_stops_early_gets_no_traceback(server, tmp_path):
    """`spkserve embed ... | head -n 1`: the closed pipe ends the command quietly with status 141 (128 + SIGPIPE)."""
    import subprocess
    import sys

    files = [str(AUDIO / "flite-slt-1.wav")] * 24  # ~24 x 5 kB of JSON: more than a pipe's 64 kB buffer
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "embed", "--target", server.target, *files],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away with most of the output unwritten
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and json.loads(first)["file"].endswith("flite-slt-1.wav")
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_bad_file_among_several_is_named_and_the_others_still_run(server, capsys, tmp_path, monkeypatch):
    """embed / diarize over several files: a file the server refuses (INVALID_ARGUMENT) or that cannot be read is
    reported under its name, the other files' results are still printed, and the status is 1."""
    monkeypatch.setenv("SPKSERVE_TARGET", server.target)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF but not audio")
    good = [str(AUDIO / f"{n}.wav") for n in ("flite-slt-1", "flite-awb-1")]
    files = [good[0], str(junk), str(tmp_path / "missing.wav"), good[1]]
    code, out, err = _run(capsys, "embed", *files)
    assert code == 1 and [o["file"] for o in out] == good
    assert f"{junk}: INVALID_ARGUMENT: audio.encoded" in err and "missing.wav" in err
    from service.cli import main

    code = main(["diarize", *files])
    out = capsys.readouterr()
    assert code == 1 and {line.split()[1] for line in out.out.splitlines()} == {"flite-slt-1", "flite-awb-1"}
    assert f"{junk}: INVALID_ARGUMENT: chunk" in out.err and "missing.wav" in out.err
    code, _, err = _run(capsys, "embed", str(junk))  # one file: the error as before, without a name
    assert code == 1 and err.startswith("INVALID_ARGUMENT: audio.encoded")


def test_ctrl_c_stops_a_client_command_without_a_traceback(live_server_for_ctrl_c):
    """Ctrl-C during `spkserve verify-stream --realtime`: status 130, one line on stderr, no traceback."""
    import signal
    import subprocess
    import sys

    target, path = live_server_for_ctrl_c
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "  # as in a terminal
            "from service.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "verify-stream", "--target", target, "--collection", "cli-c",
                             "--speaker", "slt", "--realtime", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # a provisional result: the stream is under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert json.loads(first)["final"] is False
    assert proc.returncode == 130 and err.decode().strip() == "spkserve: interrupted", err.decode()


def test_verify_stream_reads_stdin_and_raw_pcm(live_server_for_ctrl_c, capsys, monkeypatch, tmp_path):
    """verify-stream - : a WAV stream or (--pcm-rate) raw PCM piped in, sent as it arrives; --pcm-rate on a file
    too. The final verdict is the one of the decoded file."""
    import io
    import sys

    import soundfile as sf

    target, path = live_server_for_ctrl_c
    base = ["verify-stream", "--target", target, "--collection", "cli-c", "--speaker", "slt"]
    code, lines, _ = _run(capsys, *base, path)
    decoded = lines[-1]
    wave, rate = sf.read(path, dtype="int16")
    raw = wave.astype("<i2").tobytes()
    (tmp_path / "call.raw").write_bytes(raw)
    for argv, data in ((["--pcm-rate", str(rate), "-"], raw), (["-"], open(path, "rb").read()),
                       (["--pcm-rate", str(rate), str(tmp_path / "call.raw")], b"")):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        code, lines, err = _run(capsys, *base, *argv)
        assert code == 0 and lines[-1]["final"] and len(lines) > 2, (argv, err)
        assert lines[-1]["verdict"] == decoded["verdict"] and lines[-1]["llr"] == pytest.approx(decoded["llr"], abs=1e-3)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"not a wav stream")))
    code, _, err = _run(capsys, *base, "-")
    assert code == 1 and err.startswith("INVALID_ARGUMENT: chunk")


def test_embed_verify_and_diarize_read_stdin(server, capsys, monkeypatch):
    """FILE - reads standard input (any length: it goes through the stream calls); it can be given once."""
    import io
    import sys

    monkeypatch.setenv("SPKSERVE_TARGET", server.target)
    slt1, slt2 = (str(AUDIO / f"{n}.wav") for n in ("flite-slt-1", "flite-slt-2"))

    def stdin(path: str) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(open(path, "rb").read())))

    _, (plain,), _ = _run(capsys, "embed", slt1)
    stdin(slt1)
    code, (piped,), _ = _run(capsys, "embed", "-")
    assert code == 0 and piped["file"] == "-" and piped["embedding"] == pytest.approx(plain["embedding"], abs=1e-5)
    _, (both,), _ = _run(capsys, "verify", slt1, slt2)
    stdin(slt1)
    code, (piped,), _ = _run(capsys, "verify", "-", slt2)
    assert code == 0 and piped["score"] == pytest.approx(both["score"], abs=1e-4)
    stdin(slt1)
    from service.cli import main

    assert main(["diarize", "-"]) == 0
    assert capsys.readouterr().out.startswith("SPEAKER stdin 1 ")
    with pytest.raises(SystemExit, match="can be read once"):
        _run(capsys, "verify", "-", "-")


@pytest.fixture
def live_server_for_ctrl_c(server, tmp_path):
    """The module's server with `slt` enrolled in collection `cli-c`, and a 30 s recording of slt to stream."""
    import numpy as np
    import soundfile as sf

    from service.cli import main

    assert main(["enroll", "--target", server.target, "--collection", "cli-c", "--speaker", "slt",
                 str(AUDIO / "flite-slt-1.wav"), str(AUDIO / "flite-slt-2.wav")]) == 0
    wave, rate = sf.read(AUDIO / "flite-slt-2.wav", dtype="float32")
    path = tmp_path / "long.wav"
    sf.write(path, np.tile(wave, 10), rate)
    return server.target, str(path)
