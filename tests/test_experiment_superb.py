"""The published protocol end to end on a tiny SSL encoder (the CI-sized ``python -m training.experiment``),
its statistics, and the bad input it must refuse before the long work starts."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.conftest import TINY_ENCODER  # noqa: E402

TINY_ARGS = ["--calib-utts", "12", "--ubm-components", "4", "--ivector-rank", "5", "--seeds", "3", "--random-seeds", "2",
             "--utts-per-speaker", "6", "--min-speakers", "3", "--head-epochs", "5", "--crop-seconds", "1.0",
             "--calibration-draws", "2", "--permutations", "5", "--ssl-stage-steps", "2", "--ssl-stage-head-steps", "2",
             "--ssl-stage-utts", "0"]
# the pretraining run a tiny upstream was "made with" (the SSL-stage protocol continues this objective)
TINY_PRETRAIN = {"n_clusters": 8, "kmeans_frames": 2000, "crop_seconds": 1.0, "batch_size": 4, "lr": 3e-4,
                 "mask_prob": 0.5, "mask_length": 4, "channel_prob": 0.0, "distill_weight": 0.0,
                 "freeze_feature_encoder": True, "target_layer": 0}


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from models.ssl import build_encoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "tiny-ssl"
    build_encoder("wavlm", dict(TINY_ENCODER)).save_pretrained(path)
    (path / "provenance.json").write_text(json.dumps({"config": TINY_PRETRAIN}))
    return path


@pytest.fixture(scope="module")
def tiny_run(mini_corpus, tiny_encoder, tmp_path_factory):
    from training.experiment import main

    out = tmp_path_factory.mktemp("exp") / "one"
    assert main(["--out", str(out), "--checkpoint", str(tiny_encoder), "--corpus", str(mini_corpus),
                 "--ratios", "0.5", "0.97", "--primary-ratio", "0.5", "--ssl-stage-ratios", "0.5", "--metric", "eer",
                 *TINY_ARGS]) == 0
    return out


def test_tiny_superb_protocol_writes_the_interface(tiny_run):
    out = tiny_run
    rows = json.loads((out / "results.json").read_text())
    for r in rows:
        assert {"protocol", "method", "ratio", "seed", "calibration_draw", "sid_acc", "eer", "mindcf", "params",
                "rtf"} <= set(r)
        assert r["protocol"] in ("superb", "ssl_stage") and 0 <= r["sid_acc"] <= 100 and 0 <= r["eer"] <= 100
        assert r["rtf"] > 0
    kinds = {(r["protocol"], r["method"], r["ratio"]) for r in rows}
    assert kinds == {("superb", "unpruned", 0.0), ("superb", "all_ffn", 1.0),
                     ("superb", "baseline", 0.5), ("superb", "protected", 0.5), ("superb", "shuffled_protect", 0.5),
                     ("superb", "random", 0.5), ("superb", "baseline", 0.97), ("superb", "protected", 0.97),
                     ("ssl_stage", "baseline", 0.5), ("ssl_stage", "protected", 0.5)}
    count = lambda p, m, q: sum(r["protocol"] == p and r["method"] == m and r["ratio"] == q for r in rows)  # noqa: E731
    assert count("superb", "unpruned", 0.0) == 3 and count("superb", "random", 0.5) == 2 * 3
    assert count("superb", "protected", 0.5) == 2 * 3 and count("ssl_stage", "protected", 0.5) == 2 * 3
    assert {r["calibration_draw"] for r in rows if r["method"] == "protected"} == {0, 1}
    assert {r["random_draw"] for r in rows if r["method"] == "random"} == {0, 1}
    widths = {(r["method"], r["ratio"]): r["ffn_widths"] for r in rows}
    assert widths[("all_ffn", 1.0)] == [0, 0] and widths[("baseline", 0.97)] == [4, 4]  # 128 - round(0.97 * 128)
    params = {(r["method"], r["ratio"]): r["params"] for r in rows}
    assert params[("all_ffn", 1.0)] < params[("baseline", 0.5)] < params[("unpruned", 0.0)]
    s = json.loads((out / "summary.json").read_text())
    assert set(s) >= {"metric", "sesoi", "gate", "controls", "primary", "secondary", "verdict"} and s["metric"] == "eer"
    assert s["verdict"] in ("benefit", "no_benefit", "inconclusive")
    assert set(s["gate"]) >= {"headroom", "headroom_ci95", "paired_sd"}
    assert set(s["controls"]) >= {"norm_minus_random", "neuron_count", "neuron_count_null_p95", "permutations",
                                  "shuffled_protect_minus_baseline"} and s["controls"]["permutations"] == 5
    assert s["primary"]["protocol"] == "superb" and s["primary"]["ratio"] == 0.5
    assert s["primary"]["n_seeds"] == 3 and s["primary"]["n_calibration_draws"] == 2
    assert {(x["protocol"], x["ratio"]) for x in s["secondary"]} == {("superb", 0.97), ("ssl_stage", 0.5)}
    for c in [s["primary"], *s["secondary"]]:
        lo, hi = c["ci95"]
        assert lo <= c["diff"] <= hi
    # eer is lower-is-better: a positive diff means protected has the lower EER
    base = {r["seed"]: r["eer"] for r in rows if r["method"] == "baseline" and r["ratio"] == 0.5
            and r["protocol"] == "superb"}
    prot = [r["eer"] for r in rows if r["method"] == "protected" and r["ratio"] == 0.5 and r["protocol"] == "superb"]
    assert s["primary"]["diff"] == pytest.approx(np.mean(list(base.values())) - np.mean(prot))
    controls = json.loads((out / "controls.json").read_text())
    assert len(controls["per_draw"]) == 2 and len(controls["ssl_stage"]["runs"]) == 3  # baseline + 2 draws
    for d in controls["per_draw"]:
        iv = d["clusters"]["ivector"]
        assert 0 < iv["speaker_consistency"] <= 1 and isinstance(iv["speaker_like"], bool)
    page = (out / "results.md").read_text()
    assert f"**Verdict: {s['verdict']}**" in page and "shuffled protection" in page and "ssl_stage" in page
    for f in ("neurons.json", "neurons.png", "eer_vs_ratio.png", "config.json"):
        assert (out / f).stat().st_size > 0


def test_the_summary_is_what_the_rows_give(tiny_run):
    from training.experiment.summary import summarize

    out = tiny_run
    rows, cfg, controls, summary = (json.loads((out / f).read_text()) for f in
                                    ("results.json", "config.json", "controls.json", "summary.json"))
    summary.pop("run")
    assert summarize(rows, cfg, controls) == summary
    with pytest.raises(ValueError, match=r"\['pruned'\] are not among"):  # a row of no known method is refused
        summarize(rows + [{**rows[0], "method": "pruned"}], cfg, controls)


@pytest.mark.parametrize("extra, message", [
    (["--sesoi", "0"], "sesoi must be positive"),
    (["--primary-ratio", "0.8"], "primary_ratio 0.8 is not in ratios"),
    (["--ssl-stage-ratios", "0.75"], "ssl_stage_ratios [0.75] are not in ratios"),
    (["--calibration-draws", "0"], "calibration_draws must be at least 1"),
    (["--seeds", "0"], "seeds must be at least 1"),
    (["--seeds", "1"], "at least 2 seeds"),
    (["--ratios", "1.0"], "outside [0, 1)"),
    (["--ratios", "-0.1"], "outside [0, 1)"),
    (["--min-speakers", "10"], "needs at least 10"),
    (["--metric", "eer", "--gate-factor", "0"], "gate_factor must be positive"),
    (["--downstream-condition", "radio"], "downstream_condition 'radio' is not a condition"),
    (["--device", "tpu7"], "device 'tpu7' is not a device"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device is visible")]))
def test_bad_input_stops_before_the_long_work(mini_corpus, tiny_encoder, tmp_path, capsys, extra, message):
    from training.experiment import main

    args = ["--out", str(tmp_path / "x"), "--checkpoint", str(tiny_encoder), "--corpus", str(mini_corpus), *TINY_ARGS]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "x" / "neurons.json").exists()  # stopped before the statistics


def test_gate_only_on_telephone_audio_stops_after_the_controls(mini_corpus, tiny_encoder, tmp_path):
    """--gate-only runs the controls and the gate only; --downstream-condition changes the audio the heads see."""
    from training.experiment import main

    out = tmp_path / "gate"
    assert main(["--out", str(out), "--checkpoint", str(tiny_encoder), "--corpus", str(mini_corpus), "--gate-only",
                 "--downstream-condition", "telephone", "--metric", "eer", *TINY_ARGS]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == {"unpruned", "all_ffn"} and len(rows) == 2 * 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gate_only"] and "primary" not in summary and summary["run"]["data"]["condition"] == "telephone"
    assert {"headroom", "headroom_ci95", "paired_sd", "passes"} <= set(summary["gate"])
    page = (out / "results.md").read_text()
    assert "--gate-only" in page and "`telephone` channel" in page


def test_a_checkpoint_that_is_not_an_ssl_encoder_is_refused(mini_corpus, tmp_path, capsys):
    from models.ssl import SSLSpeakerConfig, build_model, save_checkpoint
    from training.experiment import main

    finetuned = save_checkpoint(build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(TINY_ENCODER),
                                                             embedding_dim=16)), tmp_path / "speaker.pt")
    assert main(["--out", str(tmp_path / "a"), "--checkpoint", str(finetuned), "--corpus", str(mini_corpus)]) == 2
    assert "--protocol finetuned" in capsys.readouterr().err
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["--out", str(tmp_path / "b"), "--checkpoint", str(other), "--corpus", str(mini_corpus)]) == 2
    assert "'bert' is not an SSL speech encoder" in capsys.readouterr().err


def test_crossed_interval_counts_draw_and_seed_variance():
    from training.experiment.stats import crossed_difference, paired_difference, paired_gate, verdict

    rng = np.random.default_rng(0)
    seeds = rng.normal(0, 1.0, 12)  # a per-seed effect shared by every draw
    one = crossed_difference(seeds[None] + 0.5)
    assert one["ci95"] == pytest.approx(paired_difference(list(seeds + 0.5), [0.0] * 12)["ci95"])
    quiet = crossed_difference(np.stack([seeds + 0.5] * 3) + rng.normal(0, 0.01, (3, 12)))
    noisy = crossed_difference(np.stack([seeds + 0.5 + b for b in (-2.0, 0.0, 2.0)]) + rng.normal(0, 0.01, (3, 12)))
    assert quiet["mean"] == pytest.approx(noisy["mean"], abs=0.01)
    width = lambda d: d["ci95"][1] - d["ci95"][0]  # noqa: E731
    assert width(noisy) > 3 * width(quiet)  # draws that disagree widen the interval
    assert noisy["draw_sd"] == pytest.approx(2.0, rel=0.05) and quiet["draw_sd"] < 0.05
    assert noisy["df"] < 4 < quiet["df"]  # few draws carry the variance: few degrees of freedom
    with pytest.raises(ValueError, match="at least 2 seeds"):
        crossed_difference(np.zeros((3, 1)))
    assert [verdict(ci, 1.0) for ci in ([0.2, 1.5], [-0.4, 0.8], [-0.5, 1.5], [-3.0, -1.0])] == \
        ["benefit", "no_benefit", "inconclusive", "no_benefit"]
    g = paired_gate({0: 70.0, 1: 72.0, 2: 71.0}, {0: 60.0, 1: 63.0, 2: 61.5}, "sid_acc", 1.0)
    assert g["headroom"] == pytest.approx(9.5) and g["passes"]
    assert not paired_gate({0: 70.0, 1: 72.0}, {0: 69.0, 1: 71.5}, "sid_acc", 1.0)["passes"]


def test_gate_and_paired_statistics():
    from training.experiment.stats import GateError, gate, jaccard, paired_difference

    g = gate([80.0, 82.0, 81.0], [60.0, 61.0, 59.0], "sid_acc")
    assert g["testable"] and g["headroom"] == pytest.approx(21.0) and g["noise"] == pytest.approx(1.0)
    assert not gate([80.0, 84.0, 76.0], [70.0, 71.0, 72.0], "sid_acc")["testable"]  # 9 points vs sd 4: 2.25x
    assert gate([5.0, 5.5], [9.0, 9.5], "eer")["headroom"] == pytest.approx(4.0)  # lower is better
    with pytest.raises(GateError, match="at least 2 seeds"):
        gate([80.0], [60.0], "sid_acc")
    with pytest.raises(GateError, match="every seed gave the same value"):
        gate([80.0, 80.0], [60.0, 60.0], "sid_acc")
    d = paired_difference([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert d["mean"] == pytest.approx(2.0) and d["ci95"][0] == pytest.approx(2.0 - 4.302653 * 1.0 / np.sqrt(3), abs=1e-4)
    assert jaccard([np.array([0, 1, 2])], [np.array([1, 2, 3])]) == pytest.approx(0.5)


def test_torchrun_two_processes_give_the_single_process_neuron_sets(tiny_run, mini_corpus, tiny_encoder, tmp_path):
    """The whole experiment under torchrun (2 CPU processes, gloo): sharded statistics and features,
    DDP heads, rank 0 writes; the neuron sets equal the single-process run's."""
    import os
    import subprocess
    import sys

    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "training.experiment", "--out", str(out), "--checkpoint", str(tiny_encoder),
                           "--corpus", str(mini_corpus), "--ratios", "0.5", "0.97", "--primary-ratio", "0.5",
                           "--ssl-stage-ratios", "0.5", "--metric", "eer", *TINY_ARGS],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((d / "neurons.json").read_text()) for d in (tiny_run, out))
    assert two["speaker"] == one["speaker"] and two["frames"] == one["frames"]
    rows_one, rows_two = (json.loads((d / "results.json").read_text()) for d in (tiny_run, out))
    key = lambda r: (r["protocol"], r["method"], r["ratio"], r["calibration_draw"], r.get("random_draw"),  # noqa: E731
                     r["seed"])
    assert sorted(map(key, rows_one), key=str) == sorted(map(key, rows_two), key=str)
    widths_one = {key(r): r["ffn_widths"] for r in rows_one}
    assert all(widths_one[key(r)] == r["ffn_widths"] for r in rows_two)  # the same pruned upstreams


def test_the_results_page_lists_every_attempt(tmp_path):
    from training.experiment.report import _attempts

    assert _attempts(tmp_path) == []
    (tmp_path / "attempts" / "tele").mkdir(parents=True)
    (tmp_path / "attempts" / "tele" / "summary.json").write_text(json.dumps(
        {"metric": "sid_acc", "headroom": -0.75, "noise": 2.38, "testable": False,
         "data": {"condition": "telephone", "crop_seconds": 3.0}}))
    lines = _attempts(tmp_path)
    assert lines[-1] == "| tele |  | telephone | 3.0 |  | sid_acc | -0.75 | 2.38 | fails |  |  |"
    (tmp_path / "attempts" / "tele" / "config.json").write_text(json.dumps({"checkpoint": "/x/runs/mix/encoder",
                                                                            "utts_per_speaker": 32}))
    assert _attempts(tmp_path)[-1] == "| tele | mix/encoder | telephone | 3.0 | 32 | sid_acc | -0.75 | 2.38 | fails |  |  |"
    summary = json.loads((tmp_path / "attempts" / "tele" / "summary.json").read_text())
    summary["layer_probe_sid_acc"] = {"unpruned": [51.7, 26.72], "all_ffn": [51.7, 32.18]}  # per hidden state
    (tmp_path / "attempts" / "tele" / "summary.json").write_text(json.dumps(summary))
    assert _attempts(tmp_path)[-1].endswith("| fails | 26.7 / 32.2 |  |")
    # the attempt's rows give the gate's headroom / noise on every metric (bar: 5)
    rows = [{"method": m, "variant": None, "ratio": ratio, "sid_acc": sid, "eer": eer, "mindcf": 0.5}
            for m, ratio, sids, eers in (("unpruned", 0.0, (60, 62, 64), (10.0, 10.5, 11.0)),
                                         ("all_ffn", 1.0, (50, 52, 54), (11.0, 11.5, 12.0)))
            for sid, eer in zip(sids, eers)]
    (tmp_path / "attempts" / "tele" / "results.json").write_text(json.dumps(rows))
    assert _attempts(tmp_path)[-1].endswith("| 26.7 / 32.2 | sid_acc 5.0, eer 2.0, mindcf - |")


def test_the_committed_summary_is_what_the_committed_rows_give():
    """training/results/summary.json is exactly what training.experiment.summary computes from the
    committed results.json, config.json (the declared design) and controls.json."""
    from pathlib import Path

    from training.experiment.summary import summarize

    res = Path(__file__).resolve().parents[1] / "training" / "results"
    rows, cfg, controls, summary = (json.loads((res / f).read_text()) for f in
                                    ("results.json", "config.json", "controls.json", "summary.json"))
    summary.pop("run")
    assert summarize(rows, cfg, controls) == summary
    assert summary["verdict"] in ("benefit", "no_benefit", "inconclusive")
    page = (res.parent / "README.md").read_text()
    assert f"**Verdict: {summary['verdict']}.**" in page  # the write-up states the verdict in its words
