"""Band maps (``models.band_map``): a wideband voiceprint carried into a narrowband probe's band, in the artifact,
the scorer, Verify, VerifyStream, the decisions job and the fitting job."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest

from models.artifact import ArtifactError, load_card
from models.audio import resample
from models.band_map import BandMap, fit_linear_map
from models.band_match import has_low_cut
from models.scoring import ModelScorer
from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
from tests.conftest import REPOSITORY, ServerThread, ge2e_with, make_config, wav_bytes
from tests.test_band_match import SR, _clip, _landline


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_the_fit_recovers_a_linear_channel_and_shrinks_towards_the_identity():
    rng = np.random.default_rng(0)
    x = _unit(rng.standard_normal((400, 8)))  # (N, D)
    a = np.eye(8) + 0.3 * rng.standard_normal((8, 8))
    shift = 0.2 * rng.standard_normal(8)
    y = x @ a + shift
    w, mx, my = fit_linear_map(x, y, ridge=1e-6)
    assert np.allclose((x - mx) @ w + my, y, atol=1e-4)
    w, mx, my = fit_linear_map(x, y, ridge=1e9)  # all shrinkage: the identity plus the mean shift
    assert np.allclose(w, np.eye(8), atol=1e-3) and np.allclose(my - mx, y.mean(0) - x.mean(0), atol=1e-6)
    bm = BandMap(np.stack([w, np.eye(8, dtype=np.float32)]), np.stack([mx, mx]), np.stack([my, mx]),
                 np.array([0.5, -1.0], np.float32))
    out = bm.apply(x[:5], low_cut=False)
    assert out.shape == (5, 8) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert np.allclose(bm.apply(x[0], low_cut=True), x[0], atol=1e-6)  # (D,) in, (D,) out; band 1 is the identity
    assert bm.offset(False) == 0.5 and bm.offset(True) == -1.0
    for bad_x, bad_y, ridge, words in ((x, y[:, :4], 1.0, "equal shapes"), (x[:1], y[:1], 1.0, "N >= 2"),
                                       (x, y, 0.0, "ridge must be > 0")):
        with pytest.raises(ValueError, match=words):
            fit_linear_map(bad_x, bad_y, ridge)
    with pytest.raises(ValueError, match="size 4, the map is for size 8"):
        bm.apply(x[:, :4], False)


def _write(path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_a_damaged_band_map_file_is_refused_naming_the_file_and_the_fault(tmp_path):
    d = 4
    good = dict(weights=np.stack([np.eye(d)] * 2), mean_x=np.zeros((2, d)), mean_y=np.zeros((2, d)),
                llr_offset=np.zeros(2))
    cases = {"missing": None, "truncated": b"PK\x03\x04 not a zip", "no_offset": {k: v for k, v in good.items() if k != "llr_offset"},
             "nan": {**good, "mean_y": np.full((2, d), np.nan)}, "shape": {**good, "weights": np.eye(d)[None]},
             "offset": {**good, "llr_offset": np.array([0.0, 99.0])}, "dim": good}
    words = {"missing": "cannot read the band map", "truncated": "cannot read the band map",
             "no_offset": "cannot read the band map", "nan": "mean_y contains NaN", "shape": r"weights must be \(2, D, D\)",
             "offset": r"outside \[-20, 20\]", "dim": "for embeddings of size 4, the model's are 8"}
    for name, content in cases.items():
        path = tmp_path / f"{name}.npz"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            _write(path, **content)
        with pytest.raises(ValueError, match=words[name]) as e:
            BandMap.load(path, 8 if name == "dim" else d)
        assert str(path) in str(e.value)


def test_the_card_needs_the_file_and_a_calibration(tmp_path):
    entry = ge2e_with(tmp_path / "a", band_map={"file": "gone.npz"})
    with pytest.raises(ArtifactError, match="band_map.file names 'gone.npz', which does not exist"):
        load_card(entry)
    entry = ge2e_with(tmp_path / "b", calibration=None, operating_point=None)
    card = json.loads((entry / "model.json").read_text())
    assert card["band_map"]  # the shipped model carries one
    with pytest.raises(ArtifactError, match="field 'band_map' needs a calibration"):
        load_card(entry)
    entry = ge2e_with(tmp_path / "c", band_map="band_map.npz")
    with pytest.raises(ArtifactError, match="field 'band_map' must be an object with a 'file' name"):
        load_card(entry)


def test_the_llr_offset_moves_the_score_and_the_cosine_threshold_together():
    scorer = ModelScorer.from_card(load_card(REPOSITORY / "ge2e"), REPOSITORY / "ge2e")
    assert scorer.band_map is not None and scorer.band_map.dim == 256
    rng = np.random.default_rng(1)
    a, b = _unit(rng.standard_normal(256)), _unit(rng.standard_normal(256))
    sa, sb = scorer.stats(a), scorer.stats(b)
    plain, shifted = scorer.score(0.7, sa, sb, 5.0, 3.0), scorer.score(0.7, sa, sb, 5.0, 3.0, llr_offset=0.9)
    assert shifted.llr == pytest.approx(plain.llr + 0.9) and shifted.normalized == plain.normalized
    cos = scorer.cosine_threshold("llr", 2.0, sa, sb, 5.0, 3.0, llr_offset=0.9)
    assert scorer.score(cos, sa, sb, 5.0, 3.0, llr_offset=0.9).llr == pytest.approx(2.0, abs=1e-4)
    assert cos < scorer.cosine_threshold("llr", 2.0, sa, sb, 5.0, 3.0)


@pytest.fixture(scope="module")
def servers(model_repo, tmp_path_factory):
    """The shipped ge2e served with band matching on (the default) and off, one wideband speaker enrolled in each."""
    out = []
    for name, on in (("on", True), ("off", False)):
        srv = ServerThread(make_config(model_repo, tmp_path_factory.mktemp(name), models=["ge2e"], band_match=on,
                                       stream_idle_timeout_seconds=2.0))
        with grpc.insecure_channel(srv.target) as ch:
            pb_grpc.SpeakerServiceStub(ch).Enroll(pb.EnrollRequest(
                collection="bm", speaker_id="slt", audio=[pb.Audio(encoded=wav_bytes(_clip("flite-slt-1")))]))
        out.append(srv)
    yield out
    for srv in out:
        srv.stop()


def _stub(srv: ServerThread):
    return pb_grpc.SpeakerServiceStub(grpc.insecure_channel(srv.target))


SLT = pb.Probe(speaker=pb.SpeakerRef(collection="bm", speaker_id="slt"))


def test_verify_carries_an_enrolled_voiceprint_into_a_calls_band(servers):
    """A landline call against a wideband enrolment: the voiceprint is mapped into the call's band and the pair gets
    the band's LLR offset, exactly as the model's band map says; a wideband probe, and the server with band_match off,
    score the voiceprint as it is."""
    from tests.test_server import metric_value, scrape

    on, off = servers
    call = wav_bytes(_landline(_clip("flite-slt-2")), 8000)
    stub = _stub(on)
    got = stub.Verify(pb.VerifyRequest(a=SLT, b=pb.Probe(audio=pb.Audio(encoded=call))))
    plain = _stub(off).Verify(pb.VerifyRequest(a=SLT, b=pb.Probe(audio=pb.Audio(encoded=call))))
    assert got.band_matched and got.b_speech.narrowband and not plain.band_matched
    assert got.llr > plain.llr, (got.llr, plain.llr)
    assert metric_value(scrape(on), 'spkserve_band_matched_total{model="ge2e"}') == 1.0
    # the same pair by hand: the voiceprint mapped into the landline band (the call lacks its low end)
    scorer = ModelScorer.from_card(load_card(REPOSITORY / "ge2e"), REPOSITORY / "ge2e")
    spk = stub.GetSpeaker(pb.GetSpeakerRequest(collection="bm", speaker_id="slt", include_voiceprint=True))
    probe = stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=call)))
    assert has_low_cut(resample(_landline(_clip("flite-slt-2")), 8000, SR), SR)
    mapped = scorer.band_map.apply(np.array(spk.voiceprint, np.float32), low_cut=True)
    pe = np.array(probe.embedding, np.float32)
    want = scorer.score(float(mapped @ pe), scorer.stats(mapped), scorer.stats(pe), spk.speech_seconds,
                        probe.speech_seconds, scorer.band_map.offset(True))
    assert got.score == pytest.approx(want.cosine, abs=1e-4) and got.llr == pytest.approx(want.llr, abs=1e-3)
    # the voiceprint sent as an embedding is mapped too; the probe sent as an embedding has no band to tell
    as_emb = pb.Probe(embedding=pb.Embedding(values=spk.voiceprint, model="ge2e"))
    by_emb = stub.Verify(pb.VerifyRequest(a=as_emb, b=pb.Probe(audio=pb.Audio(encoded=call))))
    assert by_emb.band_matched and by_emb.score == pytest.approx(got.score, abs=1e-4)
    probe_emb = pb.Probe(embedding=pb.Embedding(values=probe.embedding, model="ge2e"))
    assert not stub.Verify(pb.VerifyRequest(a=SLT, b=probe_emb)).band_matched
    wide = stub.Verify(pb.VerifyRequest(a=SLT, b=pb.Probe(audio=pb.Audio(encoded=wav_bytes(_clip("flite-slt-2"))))))
    assert not wide.band_matched


def test_identify_ranks_a_calls_candidates_in_its_band_with_the_scores_verify_gives(servers):
    on, off = servers
    for srv in servers:
        _stub(srv).Enroll(pb.EnrollRequest(collection="bm", speaker_id="awb",
                                           audio=[pb.Audio(encoded=wav_bytes(_clip("flite-awb-1")))]))
    call = pb.Probe(audio=pb.Audio(encoded=wav_bytes(_landline(_clip("flite-slt-2")), 8000)))
    got = _stub(on).Identify(pb.IdentifyRequest(collection="bm", probe=call, top_k=2))
    plain = _stub(off).Identify(pb.IdentifyRequest(collection="bm", probe=call, top_k=2))
    assert got.band_matched and not plain.band_matched
    assert [c.speaker_id for c in got.candidates] == ["slt", "awb"]
    for c in got.candidates:
        pair = _stub(on).Verify(pb.VerifyRequest(a=pb.Probe(speaker=pb.SpeakerRef(collection="bm", speaker_id=c.speaker_id)),
                                                 b=call))
        assert pair.band_matched and c.llr == pytest.approx(pair.llr, abs=1e-3) and c.score == pytest.approx(pair.score, abs=1e-4)
    assert got.candidates[0].llr > plain.candidates[0].llr
    wide = pb.Probe(audio=pb.Audio(encoded=wav_bytes(_clip("flite-slt-2"))))
    assert not _stub(on).Identify(pb.IdentifyRequest(collection="bm", probe=wide)).band_matched


@pytest.mark.parametrize("reference", ["speaker", "audio"])
def test_a_narrowband_stream_meets_its_reference_in_its_band_as_verify_does(servers, reference):
    """A call streamed against a wideband reference: an enrolled voiceprint is mapped into the call's band, reference
    audio embedded again in it, so that the final result is Verify's on the whole call."""
    on, off = servers
    x = _landline(np.concatenate([_clip("flite-slt-2"), np.zeros(SR // 2, np.float32), _clip("flite-slt-2")]))
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    ref = SLT if reference == "speaker" else pb.Probe(audio=pb.Audio(encoded=wav_bytes(_clip("flite-slt-1"))))

    def stream(srv):
        config = pb.VerifyStreamConfig(reference=ref, pcm=pb.PcmFormat(sample_rate=8000, encoding=pb.PCM_S16LE))
        msgs = [pb.VerifyStreamRequest(config=config)] + [pb.VerifyStreamRequest(chunk=pcm[i:i + 8000])
                                                          for i in range(0, len(pcm), 8000)]
        return list(_stub(srv).VerifyStream(iter(msgs)))

    results, plain_results = stream(on), stream(off)
    final, plain = results[-1], plain_results[-1]
    # the speaker-change rule scores the reference as given: its threshold was set on that
    ref_llrs = [[r.recent_reference_llr for r in rs if r.HasField("recent_reference_llr")] for rs in (results, plain_results)]
    assert ref_llrs[0] and ref_llrs[0] == pytest.approx(ref_llrs[1], abs=1e-4)
    assert final.final and final.band_matched and not plain.band_matched
    assert all(r.band_matched for r in results if r.speech_seconds >= 1.0)
    whole = _stub(on).Verify(pb.VerifyRequest(a=ref, b=pb.Probe(audio=pb.Audio(encoded=wav_bytes(x, 8000)))))
    assert whole.band_matched and final.verdict == whole.verdict
    assert final.llr == pytest.approx(whole.llr, abs=0.05) and final.llr > plain.llr


def test_models_report_their_band_map(servers):
    infos = _stub(servers[0]).ListModels(pb.ListModelsRequest()).models
    assert [m.band_map for m in infos if m.name == "ge2e"] == [True]


def test_the_decision_job_maps_voiceprints_as_verify_does():
    """``band_mapped_pairs``: a narrowband probe against a voiceprint whose channel group is not already in the
    probe's band is mapped into that band (the landline's when the probe lacks its low end), with that band's offset;
    a landline voiceprint stays as it is against a landline probe, an 8 kHz codec's against any narrowband probe
    without the low cut."""
    from models.runtime import SpeakerModel
    from training.evaluation.decisions import band_mapped_pairs
    from training.evaluation.realembed import Rendered

    model = SpeakerModel(REPOSITORY / "ge2e", ["CPUExecutionProvider"])
    scorer, bm = model.scorer, model.scorer.band_map
    stats = scorer.stats(scorer.cohort)
    landline, codec = scorer.in_band(stats, True), scorer.in_band(stats, False) & ~scorer.in_band(stats, True)
    wide = ~scorer.in_band(stats, False)
    enrol = np.concatenate([scorer.cohort[wide][:3], scorer.cohort[landline][:1], scorer.cohort[codec][:2]])  # (6, D)
    n = len(enrol)
    r = {"clean": Rendered(enrol, np.full(n, 5.0), np.zeros(n, bool), np.ones(n, bool), np.zeros(n, bool)),
         "tel": Rendered(enrol[[1, 0, 2, 3, 4, 5]], np.full(n, 3.0), np.array([True, True, False, True, True, True]),
                         np.ones(n, bool), np.array([True, False, False, True, True, False]))}
    ia = ib = np.arange(n)
    a, offsets, mapped = band_mapped_pairs(model, r, "clean", "tel", ia, ib)
    # 2: a wideband probe; 3: a landline voiceprint, a landline probe; 4: a codec's voiceprint lacks the landline's
    # low cut; 5: it is in the band of a probe without it
    assert mapped.tolist() == [True, True, False, False, True, False]
    assert np.allclose(a.emb[0], bm.apply(enrol[0], True), atol=1e-6)
    assert np.allclose(a.emb[1], bm.apply(enrol[1], False), atol=1e-6)
    assert np.allclose(a.emb[4], bm.apply(enrol[4], True), atol=1e-6)
    assert np.array_equal(a.emb[[2, 3, 5]], enrol[[2, 3, 5]])
    assert offsets.tolist() == [bm.offset(True), bm.offset(False), 0, 0, bm.offset(True), 0]
    assert np.array_equal(r["clean"].emb, enrol)  # the shared renderings are not changed


def test_the_fitting_job_writes_the_map_and_offsets_and_a_dry_run_changes_nothing(tmp_path, mini_real):
    if shutil.which("sox") is None:
        pytest.skip("sox is not installed (the gsm condition needs it: bash scripts/install_voices.sh)")
    from training.evaluation.band_map import fit_band_map, main

    entry = tmp_path / "ge2e"
    shutil.copytree(REPOSITORY / "ge2e", entry)
    (entry / "band_map.npz").unlink()
    card = json.loads((entry / "model.json").read_text())
    card["band_map"] = None
    (entry / "model.json").write_text(json.dumps(card))
    before = (entry / "model.json").read_text()
    spec = fit_band_map(entry, mini_real, folds=3, write=False, log=lambda *_: None)
    assert (entry / "model.json").read_text() == before and not (entry / "band_map.npz").exists()
    assert set(spec["fitted_on"]["bands"]) == {"narrowband", "telephone"}
    assert spec["fitted_on"]["bands"]["telephone"]["probe"] == "telephone"
    assert main(["--model-dir", str(entry), "--real", str(mini_real), "--folds", "3"]) == 0
    card = load_card(entry)
    bm = BandMap.load(entry / card.band_map["file"], 256)
    assert card.band_map["fitted_on"]["speakers"] == 3 and np.isfinite(bm.llr_offset).all()
    assert [round(float(o), 4) for o in bm.llr_offset] == [card.band_map["fitted_on"]["bands"][b]["llr_offset"]
                                                           for b in ("narrowband", "telephone")]
    assert main(["--model-dir", str(entry), "--real", str(mini_real), "--folds", "4"]) == 2  # 3 speakers
    assert main(["--model-dir", str(entry), "--real", str(mini_real), "--ridge", "0"]) == 2
