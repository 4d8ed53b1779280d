"""Scorer checks against an independent computation (scikit-learn's ROC)."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation import eer, evaluate_scores, identification_accuracy, min_dcf, read_trials, roc


def sk_eer_and_dcf(scores, labels, p_target):
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1 - tpr
    i = np.nanargmin(np.abs(fnr - fpr))
    dcf = (p_target * fnr + (1 - p_target) * fpr).min() / min(p_target, 1 - p_target)
    return (fnr[i] + fpr[i]) / 2, dcf


@pytest.mark.parametrize("seed", range(5))
def test_eer_and_mindcf_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_t, n_n = rng.integers(50, 400), rng.integers(500, 3000)
    scores = np.concatenate([rng.normal(1.5, 1, n_t), rng.normal(0, 1, n_n)])
    if seed % 2:
        scores = np.round(scores, 1)  # ties
    labels = np.concatenate([np.ones(n_t), np.zeros(n_n)]).astype(int)
    e, thr = eer(scores, labels)
    sk_e, sk_dcf = sk_eer_and_dcf(scores, labels, 0.01)
    assert abs(e - sk_e) < 2.0 / min(n_t, n_n)
    assert min_dcf(scores, labels, 0.01) == pytest.approx(sk_dcf, abs=1e-9)
    # the EER threshold splits the trials at about the EER
    fa = (scores[labels == 0] >= thr).mean()
    miss = (scores[labels == 1] < thr).mean()
    assert abs(fa - e) < 0.02 and abs(miss - e) < 0.02


def test_edge_cases(tmp_path):
    assert eer(np.array([0.9, 0.8, 0.1, 0.0]), np.array([1, 1, 0, 0]))[0] == 0.0
    assert evaluate_scores(np.array([0.0, 1.0]), np.array([1, 0])).eer == 100.0
    with pytest.raises(ValueError, match="non-target"):
        roc(np.array([0.1, 0.2]), np.array([1, 1]))
    (tmp_path / "t").write_text("a b target\nc d nontarget\n")
    assert read_trials(tmp_path / "t") == [("a", "b", 1), ("c", "d", 0)]
    (tmp_path / "t").write_text("1 id10270/x.wav id10270/y.wav\n0 id10270/x.wav id10300/z.wav\n")  # VoxCeleb lists
    assert read_trials(tmp_path / "t") == [("id10270/x.wav", "id10270/y.wav", 1), ("id10270/x.wav", "id10300/z.wav", 0)]
    (tmp_path / "t").write_text("a b maybe\n")
    with pytest.raises(ValueError, match=":1:"):
        read_trials(tmp_path / "t")
    enroll = {"x": np.array([1.0, 0.0]), "y": np.array([0.0, 1.0])}
    assert identification_accuracy(enroll, [(np.array([0.9, 0.1]), "x"), (np.array([0.9, 0.2]), "y")]) == 50.0


def test_evaluate_job_reports_each_system_and_names_a_missing_split(mini_corpus, tmp_path, capsys):
    import json

    from tests.conftest import REPOSITORY
    from training.evaluation.evaluate import main

    assert main(["--corpus", str(mini_corpus), "--models", "ge2e", "--repository", str(REPOSITORY),
                 "--out", str(tmp_path / "eval")]) == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(res) == {"logmel-meanstd", "ge2e"}
    assert res["ge2e"]["n_target"] > 0 and 0 <= res["ge2e"]["eer"] <= 100 and res["ge2e"]["rtf"] > 0
    assert (tmp_path / "eval" / "det.png").stat().st_size > 1000
    assert main(["--corpus", str(mini_corpus), "--split", "reserved", "--out", str(tmp_path / "r")]) == 2
    assert "reserved" in capsys.readouterr().err
