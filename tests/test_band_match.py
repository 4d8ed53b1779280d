"""Band matching (``models.band_match``): a landline's band told from a codec's, the wideband side limited to it, and
Verify scoring a narrowband and a wideband recording in the narrow band."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import soundfile as sf
from scipy.signal import butter, sosfiltfilt

from models.audio import resample
from models.band_match import has_low_cut, low_band_db, match_band
from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
from tests.conftest import REFERENCE, ServerThread, make_config, wav_bytes

SR = 16000
NAMES = ["flite-slt-1", "flite-slt-2", "flite-awb-1", "flite-rms-1", "flite-kal-1", "espeak-en-1"]


def _clip(name: str) -> np.ndarray:
    return sf.read(REFERENCE / "audio" / f"{name}.wav", dtype="float32")[0]


def _landline(x: np.ndarray) -> np.ndarray:
    """(T',) the 300-3400 Hz band at 8 kHz."""
    return resample(sosfiltfilt(butter(4, [300, 3400], btype="bandpass", fs=SR, output="sos"), x).astype(np.float32),
                    SR, 8000)


def _power_db(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    hz = np.fft.rfftfreq(len(x), 1 / SR)
    return float(10 * np.log10(spec[(hz >= lo) & (hz < hi)].sum() + 1e-30))


@pytest.mark.parametrize("name", NAMES)
def test_a_landline_band_is_told_from_a_codec_band(name):
    """The high-pass of a landline takes the voice's fundamental out; an 8 kHz codec's band keeps it."""
    x = _clip(name)
    assert not has_low_cut(x, SR)
    assert not has_low_cut(resample(resample(x, SR, 8000), 8000, SR), SR)  # 8 kHz band, low end intact
    assert has_low_cut(resample(_landline(x), 8000, SR), SR)
    assert has_low_cut(_landline(x), 8000)  # at its own rate too
    assert np.isnan(low_band_db(x[:1000], SR)) and not has_low_cut(x[:1000], SR)  # too short to tell
    assert not has_low_cut(np.zeros(SR, np.float32), SR)  # silence: nothing to tell


def test_match_band_keeps_the_length_and_the_band_asked_for():
    x = np.concatenate([_clip(n) for n in NAMES[:2]])
    for low_cut in (False, True):
        y = match_band(x, SR, low_cut)
        assert y.shape == x.shape and y.dtype == np.float32
        assert _power_db(y, 4200, 8000) < _power_db(x, 4200, 8000) - 30
        assert abs(_power_db(y, 500, 3000) - _power_db(x, 500, 3000)) < 1.0  # the voice's band is kept
        assert (_power_db(y, 50, 200) < _power_db(x, 50, 200) - 20) == low_cut
        assert has_low_cut(y, SR) == low_cut
    assert match_band(np.zeros(0, np.float32), SR, True).size == 0


@pytest.fixture(scope="module")
def servers(model_repo, tmp_path_factory):
    """The same repository served with band matching on (the default) and off."""
    on = ServerThread(make_config(model_repo, tmp_path_factory.mktemp("on"), models=["ge2e"]))
    off = ServerThread(make_config(model_repo, tmp_path_factory.mktemp("off"), models=["ge2e"], band_match=False))
    yield on, off
    on.stop()
    off.stop()


def _verify(srv: ServerThread, a: bytes, b, **kw) -> pb.VerifyResponse:
    with grpc.insecure_channel(srv.target) as ch:
        side_b = pb.Probe(audio=pb.Audio(encoded=b)) if isinstance(b, bytes) else pb.Probe(embedding=b)
        return pb_grpc.SpeakerServiceStub(ch).Verify(pb.VerifyRequest(a=pb.Probe(audio=pb.Audio(encoded=a)), b=side_b,
                                                                      **kw))


def test_verify_scores_a_telephone_call_against_a_wideband_recording_in_the_call_band(servers):
    """A wideband recording against the same voice on a landline: with matching the pair is a narrowband pair (the
    wideband side re-embedded through the line's band) and scores higher; an 8 kHz recording with its low end is cut
    like the line; two wideband recordings are left alone."""
    from tests.test_server import metric_value, scrape

    on, off = servers
    wide, call = wav_bytes(_clip("flite-slt-1")), wav_bytes(_landline(_clip("flite-slt-2")), 8000)
    matched, plain = _verify(on, wide, call), _verify(off, wide, call)
    assert matched.band_matched and not plain.band_matched
    assert matched.b_speech.narrowband and not matched.a_speech.narrowband
    assert matched.llr > plain.llr + 1.0, (matched.llr, plain.llr)
    assert metric_value(scrape(on), 'spkserve_band_matched_total{model="ge2e"}') == 1.0
    both_wide = _verify(on, wide, wav_bytes(_clip("flite-slt-2")))
    assert not both_wide.band_matched
    assert both_wide.llr == pytest.approx(_verify(off, wide, wav_bytes(_clip("flite-slt-2"))).llr, abs=1e-4)
    with grpc.insecure_channel(on.target) as ch:
        emb = pb_grpc.SpeakerServiceStub(ch).Embed(pb.EmbedRequest(audio=pb.Audio(encoded=call)))
    as_embedding = _verify(on, wide, pb.Embedding(values=emb.embedding, model="ge2e", speech_seconds=emb.speech_seconds))
    assert not as_embedding.band_matched  # an embedding's band is not known: nothing to match
    other = _verify(on, wav_bytes(_clip("flite-awb-1")), call)
    assert other.band_matched and other.llr < matched.llr
    codec = wav_bytes(resample(_clip("flite-slt-1"), SR, 8000), 8000)  # narrowband, its low end intact
    both_narrow, unmatched = _verify(on, codec, call), _verify(off, codec, call)
    assert both_narrow.a_speech.narrowband and both_narrow.band_matched and not unmatched.band_matched
    assert both_narrow.llr > unmatched.llr, (both_narrow.llr, unmatched.llr)  # the codec side lost its low end too


def test_the_decision_job_matches_bands_as_verify_does():
    """``band_matched_pairs``: only pairs with a narrowband side change, and each side wider than the pair's narrowest
    band (8 kHz, with the low cut when either side has it) takes the embedding made in that band."""
    from training.evaluation.decisions import band_match_needs, band_matched_pairs, matched_key
    from training.evaluation.realembed import Rendered

    def rendered(base: float, narrow: list[bool], low: list[bool]) -> Rendered:
        n = len(narrow)
        return Rendered(np.full((n, 2), base, np.float32) + np.arange(n, dtype=np.float32)[:, None], np.ones(n),
                        np.array(narrow), np.ones(n, bool), np.array(low))

    r = {"clean": rendered(0, [False, False, True], [False, False, False]),
         "tel": rendered(10, [True, True, False], [True, False, False]),
         matched_key("clean", False): rendered(100, [True] * 3, [False] * 3),
         matched_key("clean", True): rendered(200, [True] * 3, [True] * 3),
         matched_key("tel", False): rendered(300, [True] * 3, [False] * 3)}  # ("tel", True): no trial needs it
    ia, ib = np.array([0, 1, 2, 2, 0]), np.array([0, 1, 0, 2, 2])
    assert band_match_needs(r, "clean", "tel", ia, ib) == {("clean", False), ("clean", True), ("tel", False)}
    a, b, matched = band_matched_pairs(r, "clean", "tel", ia, ib)
    assert matched.tolist() == [True, True, True, True, False]
    assert a.emb[:, 0].tolist() == [200, 101, 202, 2, 0]  # 0: the probe lost its low end; 1: it kept it; 2: both
    assert b.emb[:, 0].tolist() == [10, 11, 10, 302, 12]  # narrowband, one with its low end; 3: the probe is wider
    assert r["clean"].emb[0, 0] == 0  # the shared renderings are not changed
