"""Layer-wise analysis tools: CKA, purity, broad phone classes, neuron correspondence, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.conftest import TINY_ENCODER  # noqa: E402
from training.experiment.analysis import broad_classes, linear_cka, main, neuron_correspondence, purity  # noqa: E402


def test_linear_cka_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20))
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)  # invariant to rotation and scale
    assert linear_cka(x, rng.normal(size=(300, 20))) < 0.2  # unrelated features


def test_purity_and_broad_classes():
    assert purity(np.array([0, 0, 1, 1]), np.array([2, 2, 1, 1])) == 1.0
    assert purity(np.array([0, 0, 0, 0]), np.array([1, 1, 2, 2])) == 0.5
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    wave = np.concatenate([np.zeros(8000), 0.5 * np.sin(2 * np.pi * 150 * t), 0.3 * rng.normal(size=8000)])
    classes = broad_classes(wave.astype(np.float32), 74)
    assert np.mean(classes[2:22] == 0) > 0.9  # silence
    assert np.mean(classes[27:47] == 1) > 0.9  # a 150 Hz tone: voiced
    assert np.mean(classes[52:72] == 2) > 0.9  # white noise: unvoiced


def test_neuron_correspondence_finds_a_permutation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    same = neuron_correspondence(a, a)
    assert same["mean_best_abs_corr"] == pytest.approx(1.0) and same["same_index_share"] == 1.0
    perm = rng.permutation(16)
    shuffled = neuron_correspondence(a, a[:, perm])
    assert shuffled["mean_best_abs_corr"] == pytest.approx(1.0) and shuffled["same_index_share"] < 0.3


def test_analysis_cli_on_two_models(mini_corpus, tmp_path, capsys):
    from models.ssl import SSLSpeakerConfig, build_encoder, build_model, save_checkpoint

    torch.manual_seed(0)
    build_encoder("wavlm", dict(TINY_ENCODER)).save_pretrained(tmp_path / "enc")
    ckpt = save_checkpoint(build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(TINY_ENCODER), embedding_dim=16)),
                           tmp_path / "spk.pt")
    out = tmp_path / "an"
    assert main(["--out", str(out), "--model", f"pre={tmp_path / 'enc'}", "--model", f"ft={ckpt}",
                 "--corpus", str(mini_corpus), "--utts-per-speaker", "4", "--frames-per-utt", "8"]) == 0
    res = json.loads((out / "analysis.json").read_text())
    for name in ("pre", "ft"):
        r = res["per_model"][name]
        assert len(r["probe_sid_acc"]) == 3 and all(0 <= a <= 100 for a in r["probe_sid_acc"])
        assert len(r["phone_class_purity"]) == 3 and len(r["cka_layers"]) == 3
        assert all(r["cka_layers"][i][i] == pytest.approx(1.0, abs=1e-3) for i in range(3))
        assert (out / f"cka-{name}.png").stat().st_size > 0
    cross = res["cross_model"]["pre|ft"]
    assert len(cross["cka"]) == 3 and len(cross["neuron_correspondence"]) == 2
    assert (out / "cka-pre-vs-ft.png").stat().st_size > 0 and (out / "probes.png").stat().st_size > 0
    assert main(["--out", str(out), "--model", "nopath"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["--out", str(out), "--model", f"x={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
