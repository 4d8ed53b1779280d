"""models.scoring: S-norm, calibration fit, Cllr/minCllr, thresholds, and artifact checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from models.artifact import ArtifactError, load_card
from models.scoring import (Calibration, ModelScorer, cllr, cohort_stats, fit_calibration, min_cllr, pav, snorm,
                            snorm_inverse, threshold_for_far)
from tests.conftest import REPOSITORY


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


def _calibrated_copy(tmp_path, **card_changes):
    d = tmp_path / "ge2e"
    shutil.copytree(REPOSITORY / "ge2e", d)
    raw = json.loads((d / "model.json").read_text())
    raw.update(card_changes)
    (d / "model.json").write_text(json.dumps(raw))
    return d


def test_cohort_and_calibration_errors_name_the_problem(tmp_path):
    from models.runtime import SpeakerModel

    rng = np.random.default_rng(3)
    base = dict(cohort={"file": "cohort.npy", "size": 4}, calibration={"score": "snorm", "scale": 2.0, "offset": 0.0},
                operating_point={"scale": "llr", "threshold": 0.0}, format_version=2)
    d = _calibrated_copy(tmp_path, **base)
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
        d2 = _calibrated_copy(tmp_path / str(abs(hash(match))), **{**base, **changes})
        np.save(d2 / "cohort.npy", rng.normal(size=(4, 256)).astype(np.float32))
        with pytest.raises(ArtifactError, match=match):
            load_card(d2)
