"""models.scoring: S-norm, calibration fit, Cllr/minCllr, thresholds, and artifact checks."""

from __future__ import annotations


import numpy as np
import pytest

from models.artifact import ArtifactError, load_card
from models.scoring import (
    Calibration,
    ModelScorer,
    cllr,
    cohort_stats,
    fit_calibration,
    min_cllr,
    pav,
    snorm,
    snorm_inverse,
    threshold_for_far,
)
from tests.conftest import ge2e_with


def test_fit_recovers_the_true_llr_of_gaussian_scores():
    # target ~ N(2, 1), non-target ~ N(-1, 1): llr(s) = 3 s - 1.5 exactly
    rng = np.random.default_rng(0)
    tar, non = rng.normal(2, 1, 20000), rng.normal(-1, 1, 60000)
    scores = np.concatenate([tar, non])
    labels = np.concatenate([np.ones(tar.size), np.zeros(non.size)])
    cal = fit_calibration(scores, labels)
    assert cal.scale == pytest.approx(3.0, rel=0.03) and cal.offset == pytest.approx(-1.5, abs=0.06)
    llr = cal.llr(scores)
    assert min_cllr(llr, labels) <= cllr(llr, labels) < min_cllr(llr, labels) + 0.01  # well calibrated
    # a badly scaled copy is worse calibrated but equally discriminating
    assert cllr(5 * llr + 3, labels) > cllr(llr, labels) + 0.2
    assert min_cllr(5 * llr + 3, labels) == pytest.approx(min_cllr(llr, labels), abs=1e-9)


def test_cllr_reference_points():
    labels = np.array([1, 1, 0, 0])
    assert cllr(np.zeros(4), labels) == pytest.approx(1.0)  # "don't know" costs exactly one bit
    assert cllr(np.array([30, 30, -30, -30.0]), labels) < 1e-10
    assert cllr(np.array([-30, -30, 30, 30.0]), labels) > 40  # confidently wrong


def test_pav_matches_isotonic_regression():
    IsotonicRegression = pytest.importorskip("sklearn.isotonic").IsotonicRegression

    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=500), 1)  # with ties
    y = (rng.uniform(size=500) < 1 / (1 + np.exp(-2 * s))).astype(float)
    ours = pav(s, y)
    # sklearn pools ties by their mean first, as pav does
    ref = IsotonicRegression().fit(s, y).predict(s)
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_threshold_for_far():
    labels = np.array([0] * 100 + [1] * 10)
    scores = np.concatenate([np.arange(100) / 100.0, np.full(10, 0.985)])
    thr, far, frr = threshold_for_far(scores, labels, 0.01)
    assert far <= 0.01 and (scores[labels == 0] >= thr).sum() == 1 and frr == 0.0
    thr, far, _ = threshold_for_far(scores, labels, 0.0)
    assert far == 0.0 and thr > 0.99


def test_snorm_and_its_inverse():
    rng = np.random.default_rng(2)
    cohort = rng.normal(size=(50, 8))
    cohort /= np.linalg.norm(cohort, axis=1, keepdims=True)
    e, t = cohort_stats(cohort[:2], cohort)  # (2,) rows
    assert np.all(e[1] > 0)
    s = 0.4
    v = snorm(s, e, t)
    assert v == pytest.approx(0.5 * ((s - e[0]) / e[1] + (s - t[0]) / t[1]))
    assert snorm_inverse(v, e, t) == pytest.approx(s)
    cal = Calibration(2.0, -1.0)
    scorer = ModelScorer(cohort.astype(np.float32), cal, "llr", 0.5)
    thr = scorer.cosine_threshold("llr", 0.5, e, t)
    assert scorer.score(thr, e, t).llr == pytest.approx(0.5)
    assert scorer.score(1.0000002, e, t).cosine == 1.0  # clipped to the API's range


def test_scorer_threshold_checks():
    scorer = ModelScorer(None, None, "cosine", 0.7)
    with pytest.raises(ValueError, match="threshold.*no calibration"):
        scorer.check_threshold("llr", 1.0, "threshold")
    with pytest.raises(ValueError, match=r"threshold: 1.5 is outside the cosine scale's range"):
        scorer.check_threshold("cosine", 1.5, "threshold")
    with pytest.raises(ValueError):
        Calibration(float("nan"), 0.0)
    with pytest.raises(ValueError):
        Calibration(-1.0, 0.0)


def test_cohort_and_calibration_errors_name_the_problem(tmp_path):
    from models.runtime import SpeakerModel

    rng = np.random.default_rng(3)
    base = dict(cohort={"file": "cohort.npy", "size": 4}, calibration={"score": "snorm", "scale": 2.0, "offset": 0.0},
                operating_point={"scale": "llr", "threshold": 0.0}, format_version=2)
    d = ge2e_with(tmp_path, **base)
    np.save(d / "cohort.npy", rng.normal(size=(4, 128)).astype(np.float32))  # wrong embedding size
    with pytest.raises(ArtifactError, match=r"cohort.npy: cohort has shape \(4, 128\), expected \(M, 256\)"):
        SpeakerModel(d)
    np.save(d / "cohort.npy", np.full((4, 256), np.nan, np.float32))
    with pytest.raises(ArtifactError, match="NaN or inf"):
        SpeakerModel(d)
    (d / "cohort.npy").unlink()
    with pytest.raises(ArtifactError, match="cohort.file names 'cohort.npy', which does not exist"):
        load_card(d)
    for changes, match in [
        (dict(calibration={"score": "snorm", "scale": "nan", "offset": 0.0}), "calibration.scale"),
        (dict(calibration={"score": "snorm", "scale": 2.0}), "calibration.offset"),
        (dict(calibration=None), "operating_point.scale.*no calibration"),
        (dict(cohort=None), "calibration.*needs a cohort"),
        (dict(operating_point={"scale": "loudness", "threshold": 0}), "operating_point.scale"),
    ]:
        d2 = ge2e_with(tmp_path / str(abs(hash(match))), **{**base, **changes})
        np.save(d2 / "cohort.npy", rng.normal(size=(4, 256)).astype(np.float32))
        with pytest.raises(ArtifactError, match=match):
            load_card(d2)


# -- channel groups, quality terms, false-accept table ----------------------------------
def _grouped_cohort(rng, d=16, n_clean=60, n_tel=20):
    """Two channel groups: 'clean' voiceprints, and 'telephone' ones sharing a channel direction."""
    channel, mic = rng.normal(size=(2, d))
    clean = rng.normal(size=(n_clean, d)) + 1.5 * mic
    tel = rng.normal(size=(n_tel, d)) + 3.0 * channel
    vecs = np.concatenate([clean, tel])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs.astype(np.float32), np.array([0] * n_clean + [1] * n_tel), channel


def test_channel_matched_snorm_removes_a_shared_channel():
    from models.scoring import group_centroids

    rng = np.random.default_rng(5)
    cohort, groups, channel = _grouped_cohort(rng)
    cent = group_centroids(cohort, groups, 2)
    plain_scores, matched_scores = [], []
    for _ in range(200):  # pairs of different speakers on the same channel
        a, b = rng.normal(size=(2, 16)) + 3.0 * channel
        a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
        matched = cohort_stats(np.stack([a, b]), cohort, groups, cent)
        assert list(matched[:, 2]) == [1.0, 1.0]  # both sides assigned to the telephone group
        plain = cohort_stats(np.stack([a, b]), cohort)
        plain_scores.append(snorm(float(a @ b), plain[0], plain[1]))
        matched_scores.append(snorm(float(a @ b), matched[0], matched[1]))
    assert np.mean(plain_scores) > 1.0  # against every voiceprint: the shared channel reads as evidence
    assert abs(np.mean(matched_scores)) < 0.5  # against its own channel group: impostors near 0
    left_out = cohort_stats(cohort[:1], cohort, groups, cent, exclude=np.arange(80)[None] % 2 == 0)
    assert left_out[0, 0] != pytest.approx(cohort_stats(cohort[:1], cohort, groups, cent)[0, 0])


def test_quality_terms_of_the_calibration():
    cal = Calibration(2.0, -1.0, mismatch_scale=-0.5, mismatch_offset=1.0, speech=0.5, speech_reference=4.0)
    assert cal.llr(1.0) == pytest.approx(2.0 - 1.0 + 0.5 * np.log(4.0))
    assert cal.llr(1.0, 1.0, 2.0) == pytest.approx(1.5 - 1.0 + 1.0 + 0.5 * np.log(2.0))
    assert cal.llr(1.0, 0.0, 0.2) == pytest.approx(cal.llr(1.0, 0.0, 1.0))  # clipped to 1-8 s
    assert cal.normalized(cal.llr(0.7, 1.0, 3.0), 1.0, 3.0) == pytest.approx(0.7)
    assert Calibration.from_card(cal.to_card()) == cal
    with pytest.raises(ValueError, match="mismatch"):
        Calibration(1.0, 0.0, mismatch_scale=-1.5)
    # the fit recovers a mismatch shift: mismatched targets score 2 lower
    rng = np.random.default_rng(6)
    m = rng.integers(0, 2, 40000).astype(float)
    y = rng.uniform(size=40000) < 0.3
    s = np.where(y, rng.normal(2, 1, 40000) - 2 * m, rng.normal(-1, 1, 40000) - 2 * m)
    fit = fit_calibration(s, y, mismatch=m, min_speech=np.full(40000, 4.0))
    assert fit.mismatch_offset == pytest.approx(2 * 3.0, rel=0.1)  # llr = 3 s - 1.5: a shift of 2 in s is 6
    assert cllr(fit.llr(s, m, 4.0), y) < cllr(fit_calibration(s, y).llr(s), y) - 0.05
    # and a further band-limit shift among the mismatched pairs: another 1 lower
    b = m * rng.integers(0, 2, 40000)
    s2 = s - b
    fit2 = fit_calibration(s2, y, mismatch=m, min_speech=np.full(40000, 4.0), band=b)
    assert fit2.band_offset == pytest.approx(3.0, rel=0.15) and fit2.mismatch_offset == pytest.approx(6.0, rel=0.1)
    assert fit2.llr(1.0, 1.0, 4.0, 1.0) == pytest.approx(fit2.llr(1.0, 1.0, 4.0) + fit2.band_scale + fit2.band_offset)
    assert fit2.llr(1.0, 0.0, 4.0, 1.0) == pytest.approx(fit2.llr(1.0))  # band counts only with a mismatch
    with pytest.raises(ValueError, match="scale must be > 0"):
        Calibration(1.0, 0.0, mismatch_scale=-0.5, band_scale=-0.6)


def test_scorer_with_groups_and_far_table():
    rng = np.random.default_rng(7)
    cohort, groups, channel = _grouped_cohort(rng)
    cal = Calibration(2.0, -1.0, mismatch_scale=-0.5, mismatch_offset=-1.0)
    table = [[0.001, 4.0], [0.01, 2.0], [0.1, 0.5]]
    scorer = ModelScorer(cohort, cal, "llr", 2.0, groups, ["clean", "telephone"], ["telephone"], table)
    tel = cohort[60] + 0.01
    clean = cohort[5] + 0.01
    st, sc = scorer.stats(tel / np.linalg.norm(tel)), scorer.stats(clean / np.linalg.norm(clean))
    assert scorer.narrowband(st) and not scorer.narrowband(sc) and scorer.group_name(st) == "telephone"
    mixed = scorer.score(0.5, sc, st)
    assert mixed.llr == pytest.approx(1.5 * mixed.normalized - 2.0)  # the mismatch terms apply
    thr = scorer.cosine_threshold("llr", 2.0, sc, st)
    assert scorer.score(thr, sc, st).llr == pytest.approx(2.0)
    assert scorer.llr_for_far(0.01) == pytest.approx(2.0)
    assert scorer.llr_for_far(np.sqrt(0.001 * 0.01)) == pytest.approx(3.0)  # log-rate interpolation
    with pytest.raises(ValueError, match="target_false_accept_rate: 0.5 is outside"):
        scorer.llr_for_far(0.5)
    with pytest.raises(ValueError, match="no false-accept table"):
        ModelScorer(cohort, cal, "llr", 2.0).llr_for_far(0.01)
    with pytest.raises(ValueError, match="every one of"):
        ModelScorer(cohort, cal, "llr", 2.0, np.zeros(80, int), ["clean", "telephone"])


def test_grouped_card_fields_are_checked(tmp_path):
    from models.runtime import SpeakerModel

    rng = np.random.default_rng(8)
    base = dict(cohort={"file": "cohort.npy", "size": 4, "groups_file": "groups.npy", "groups": ["clean", "telephone"],
                        "narrowband_groups": ["telephone"]},
                calibration={"score": "snorm", "scale": 2.0, "offset": 0.0, "mismatch_scale": -0.5,
                             "mismatch_offset": -1.0, "speech": 0.3, "speech_reference": 4.0},
                operating_point={"scale": "llr", "threshold": 2.0, "far_table": [[0.01, 2.5], [0.1, 0.5]]},
                format_version=3)
    d = ge2e_with(tmp_path, **base)
    np.save(d / "cohort.npy", rng.normal(size=(4, 256)).astype(np.float32))
    with pytest.raises(ArtifactError, match="cohort.groups_file names 'groups.npy'"):
        load_card(d)
    np.save(d / "groups.npy", np.array([0, 0, 1, 1], np.int16))
    model = SpeakerModel(d)
    assert model.scorer.group_names == ["clean", "telephone"] and model.scorer.far_table[0] == (0.01, 2.5)
    np.save(d / "groups.npy", np.array([0, 0, 0], np.int16))
    with pytest.raises(ArtifactError, match="expected 4 integer group indices"):
        SpeakerModel(d)
    for i, (changes, match) in enumerate([
        (dict(cohort={**base["cohort"], "narrowband_groups": ["satellite"]}), "cohort.narrowband_groups"),
        (dict(calibration={**base["calibration"], "mismatch_scale": -3.0}), "calibration.mismatch_scale"),
        (dict(operating_point={**base["operating_point"], "far_table": [[0.1, 0.5], [0.01, 2.5]]}),
         "operating_point.far_table"),
        (dict(operating_point={**base["operating_point"], "far_table": [[2.0, 0.5]]}), "operating_point.far_table"),
    ]):
        d2 = ge2e_with(tmp_path / str(i), **{**base, **changes})
        np.save(d2 / "cohort.npy", rng.normal(size=(4, 256)).astype(np.float32))
        np.save(d2 / "groups.npy", np.array([0, 0, 1, 1], np.int16))
        with pytest.raises(ArtifactError, match=match):
            load_card(d2)
