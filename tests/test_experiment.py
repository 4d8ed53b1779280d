"""The compression experiment end to end on a tiny model and a corpus made from the committed audio
(the CI-sized version of ``python -m training.experiment``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

torch = pytest.importorskip("torch")

from tests.conftest import TINY_ENCODER  # noqa: E402


def test_tiny_experiment_writes_results(mini_corpus, tmp_path):
    from models.ssl import SSLSpeakerConfig, build_model, load_checkpoint, save_checkpoint
    from training.experiment import main

    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(TINY_ENCODER), embedding_dim=16)),
                           tmp_path / "tiny.pt")
    out = tmp_path / "exp"
    rc = main(["--out", str(out), "--protocol", "finetuned", "--checkpoint", str(ckpt), "--corpus", str(mini_corpus), "--ratios", "0.5",
               "--calib-utts", "18", "--recovery-steps", "2", "--ubm-components", "4", "--ivector-rank", "5"])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["protocol"] for r in rows} == {"finetuned"}
    assert {(r["method"], r["ratio"], r["recovery"]) for r in rows} == {
        ("unpruned", 0.0, False), ("baseline", 0.5, False), ("baseline", 0.5, True),
        ("protected", 0.5, False), ("protected", 0.5, True)}
    for r in rows:
        assert 0 <= r["eer"] <= 100 and 0 <= r["mindcf"] and r["params"] > 0 and r["rtf"] > 0
    unpruned = next(r for r in rows if r["method"] == "unpruned")
    pruned = next(r for r in rows if r["method"] == "protected" and not r["recovery"])
    assert pruned["ffn_widths"] == [64, 64] and pruned["params"] < unpruned["params"]
    sets = json.loads((out / "neurons.json").read_text())
    assert len(sets["speaker"]) == 2 and sets["params"]["sigma"] == 0.8
    assert (out / "neurons.png").stat().st_size > 0 and (out / "eer_vs_ratio.png").stat().st_size > 0
    clusters = json.loads((out / "clusters.json").read_text())
    assert len(clusters["ssl_cluster_frame_share"]) == 3 and len(clusters["ivector_cluster_composition"]) == 2
    # the protected 50% model rebuilds from its {state_dict, config}, with its per-layer widths
    model, saved = load_checkpoint(out / "protected-r50.pt")
    assert saved["config"]["ffn_widths"] == [64, 64] and saved["pruning"]["method"] == "protected"


def test_experiment_bad_input_stops_early(mini_corpus, tmp_path):
    from training.experiment import main

    assert main(["--out", str(tmp_path / "a"), "--protocol", "finetuned", "--checkpoint", str(tmp_path / "missing.pt"), "--corpus", str(mini_corpus)]) == 2
    assert main(["--out", str(tmp_path / "b"), "--ratios", "1.0", "--corpus", str(mini_corpus)]) == 2


def test_recompute_variant_and_determinism(mini_corpus, tmp_path):
    from models.ssl import SSLSpeakerConfig, build_model, ffn_layers
    from training.common import load_split
    from training.experiment import ExperimentConfig, run_experiment, speaker_neuron_sets

    torch.manual_seed(0)
    model = build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(TINY_ENCODER), embedding_dim=16)).eval()
    cfg = ExperimentConfig(out=str(tmp_path / "r"), protocol="finetuned", corpus=str(mini_corpus), calib_utts=12, ubm_components=4,
                           ivector_rank=5, ratios=[0.5], recovery=[False], variant="recompute")
    _, waves, _ = load_split(mini_corpus, "train", progress=False)
    a, _, _ = speaker_neuron_sets(model, waves[:12], cfg)
    b, _, _ = speaker_neuron_sets(model, waves[:12], cfg)
    assert a.speaker == b.speaker and a.ssl == b.ssl  # deterministic given the seed
    from models.ssl import save_checkpoint

    cfg.checkpoint = str(save_checkpoint(model, tmp_path / "m.pt"))
    rows = run_experiment(cfg)
    protected = next(r for r in rows if r["method"] == "protected")
    assert protected["ffn_widths"] == [64, 64]
    assert len(ffn_layers(model.encoder)) == 2


def test_bad_calibration_data_is_named_before_work_starts(mini_corpus, tmp_path, capsys):
    import shutil

    from models.ssl import SSLSpeakerConfig, build_model, save_checkpoint
    from training.experiment import main

    ckpt = save_checkpoint(build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(TINY_ENCODER), embedding_dim=16)),
                           tmp_path / "m.pt")
    broken = tmp_path / "broken"
    shutil.copytree(mini_corpus, broken)
    scp = (broken / "train" / "wav.scp").read_text().splitlines()
    (broken / "train" / "wav.scp").write_text("\n".join(scp + ["ghost-0 /nonexistent/ghost.wav"]) + "\n")
    assert main(["--out", str(tmp_path / "a"), "--protocol", "finetuned", "--checkpoint", str(ckpt), "--corpus", str(broken), "--calib-utts", "100"]) == 2
    assert "missing" in capsys.readouterr().err
    short = tmp_path / "short"
    shutil.copytree(mini_corpus, short)
    lines = (short / "train" / "wav.scp").read_text().splitlines()
    sf.write(short / "tiny.wav", np.zeros(1600, np.float32), 16000)  # 0.1 s; the shared fixture stays intact
    lines[0] = f"{lines[0].split()[0]} {short / 'tiny.wav'}"
    (short / "train" / "wav.scp").write_text("\n".join(lines) + "\n")
    assert main(["--out", str(tmp_path / "b"), "--protocol", "finetuned", "--checkpoint", str(ckpt), "--corpus", str(short), "--calib-utts", "100"]) == 2
    assert "too short" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "c"), "--protocol", "finetuned", "--checkpoint", str(ckpt), "--corpus", str(mini_corpus),
                 "--calib-utts", "100", "--k-ivec", "500"]) == 2
    assert "clusters" in capsys.readouterr().err


def test_default_superb_upstream_is_the_committed_distilled_encoder():
    """The published protocol's default checkpoint exists, passes the SSL-encoder check and carries
    provenance that says it was distilled (so results are never presented as purely self-supervised)."""
    from training.experiment.run import DEFAULT_CHECKPOINTS, ExperimentConfig, _check_checkpoint

    path = _check_checkpoint(ExperimentConfig(out="unused"))
    assert path == DEFAULT_CHECKPOINTS["superb"] and path.name == "ssl-distilled"
    prov = json.loads((path / "provenance.json").read_text())
    assert "distillation" in prov["kind"]
    assert prov["config"]["distill_weight"] > 0 and prov["config"]["distill_center"]
    assert prov["config"]["freeze_feature_encoder"]
