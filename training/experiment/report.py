"""The results page of the compression experiment: ``results.md`` and its plot.

The page states the verdict first, in the words ``summary.json`` gives it (``benefit``,
``no_benefit``, ``inconclusive``) and why, then the gate and controls that qualify it, then the
comparisons and tables; the attempts table lists every other testbed tried.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.experiment.stats import HIGHER_IS_BETTER, GateError, gate, mean_std

__all__ = ["write_results_page", "plot_metric"]

_LABEL = {"sid_acc": "SID accuracy (%)", "eer": "EER (%)", "mindcf": "minDCF"}


def _key(r: dict) -> tuple:
    return r["method"], r.get("variant"), r["ratio"]


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(_key(r), []).append(r)
    return out


def _metric_gates(rows: list[dict], factor: float) -> dict[str, dict | str]:
    """The sensitivity gate on each metric from the unpruned and all-FFN-removed rows: metric -> the
    gate's result, or the reason it cannot be computed."""
    groups = _groups(rows)
    unpruned, none = groups.get(("unpruned", None, 0.0), []), groups.get(("all_ffn", None, 1.0), [])
    out: dict[str, dict | str] = {}
    for metric in HIGHER_IS_BETTER:
        try:
            out[metric] = gate([r[metric] for r in unpruned], [r[metric] for r in none], metric, factor)
        except GateError as e:
            out[metric] = str(e)
    return out


def _gates(rows: list[dict], factor: float) -> str:
    """The sensitivity gate computed on each metric, in words."""
    parts = []
    for metric, g in _metric_gates(rows, factor).items():
        if isinstance(g, str):
            parts.append(f"{metric}: cannot be computed ({g})")
            continue
        parts.append(f"{metric} headroom {g['headroom']:.3g} vs noise {g['noise']:.3g} "
                     f"({'testable' if g['testable'] else 'not testable'})")
    return "; ".join(parts)


def _gate_ratios(rows: list[dict], factor: float) -> str:
    """Headroom / noise on each metric, e.g. "sid_acc 1.6, eer 4.4, mindcf 3.0" (the bar is ``factor``)."""
    return ", ".join(f"{metric} {g['ratio']:.1f}" if not isinstance(g, str) else
                     f"{metric} -" for metric, g in _metric_gates(rows, factor).items())


def _attempts(out: Path) -> list[str]:
    """A table of the other testbeds tried, from ``out/attempts/*/summary.json`` (runs written there)."""
    import json

    found = sorted((out / "attempts").glob("*/summary.json"))
    if not found:
        return []
    lines = ["", "Other testbeds tried (each a run under `attempts/NAME/`, its own results.md there):", "",
             "| attempt | upstream | downstream channel | crop s | utts/speaker | metric | headroom | noise | gate "
             "| last-layer probe SID %, intact / FFN-free | headroom / noise on each metric |",
             "|---|---|---|---:|---:|---|---:|---:|---|---|---|"]
    for f in found:
        a = json.loads(f.read_text())
        d = a.get("data", {})
        cfg = f.parent / "config.json"
        conf = json.loads(cfg.read_text()) if cfg.is_file() else {}
        ckpt = Path(conf["checkpoint"]) if conf.get("checkpoint") else None
        upstream = f"{ckpt.parent.name}/{ckpt.name}" if ckpt else ""  # e.g. checkpoints/ssl-pretrained
        res = f.parent / "results.json"
        ratios = _gate_ratios(json.loads(res.read_text()), a.get("gate_factor", 5.0)) if res.is_file() else ""
        probe = a.get("layer_probe_sid_acc", {})
        last = (f"{probe['unpruned'][-1]:.1f} / {probe['all_ffn'][-1]:.1f}"
                if probe.get("unpruned") and probe.get("all_ffn") else "")
        lines.append(f"| {f.parent.name} | {upstream} | {d.get('condition') or 'clean'} | {d.get('crop_seconds', '')} | "
                     f"{conf.get('utts_per_speaker', '')} | {a['metric']} | "
                     f"{a['headroom']:.2f} | {a['noise']:.2f} | {'passes' if a['testable'] else 'fails'} | {last} | {ratios} |")
    return lines


def _ci(c: dict | None) -> str:
    if not c:
        return "-"
    return f"{c['diff']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"


def _method_table(rows: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["protocol"], r["method"], r["ratio"]), []).append(r)
    lines = ["| protocol | method | removed | SID acc % | EER % | minDCF | params | RTF | rows (draws x seeds) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (proto, method, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "superb", kv[0][2],
                                                                               kv[0][1])):
        cells = [fmt.format(*mean_std([r[k] for r in rs])) for k, fmt in
                 (("sid_acc", "{:.1f} ± {:.1f}"), ("eer", "{:.2f} ± {:.2f}"), ("mindcf", "{:.3f} ± {:.3f}"))]
        draws = len({(r.get("calibration_draw"), r.get("random_draw")) for r in rs})
        lines.append(f"| {proto} | {method} | {ratio:.0%} | {' | '.join(cells)} | {rs[0]['params']:,} | "
                     f"{np.mean([r['rtf'] for r in rs]):.4f} | {len(rs)} ({draws} x {len(rs) // draws}) |")
    return lines


def write_results_page(rows: list[dict], summary: dict, controls: dict, out: Path) -> Path:
    """Write ``results.md`` (the verdict in words first, then the gate, controls, comparisons, the table
    of means ± SD per method, cluster purity) and the metric-vs-ratio plot."""
    run = summary.get("run", {})
    lines = ["# Compression experiment: does protecting speaker neurons help FFN pruning?", ""]
    condition = run.get("data", {}).get("condition")
    if condition:
        lines += [f"Downstream audio passed through the `{condition}` channel.", ""]
    if summary.get("gate_only"):
        g = summary["gate"]
        lines += ["Run with `--gate-only`: the controls only, no pruned upstreams.", "",
                  f"Gate: removing every FFN neuron costs {g['headroom']:.2f} points of {_LABEL[summary['metric']]}, "
                  f"95% CI [{g['headroom_ci95'][0]:.2f}, {g['headroom_ci95'][1]:.2f}] (passes at >= {g['threshold']:g}: "
                  f"{'yes' if g['passes'] else 'no'}).", "", *_method_table(rows)]
        path = out / "results.md"
        path.write_text("\n".join(lines) + "\n")
        return path
    m, sesoi, p, g, c = summary["metric"], summary["sesoi"], summary["primary"], summary["gate"], summary["controls"]
    lines += [f"**Verdict: {summary['verdict']}**: {summary['verdict_reason']}.", "",
              f"Declared before the run: primary comparison protected minus norm-only under the `{p['protocol']}` "
              f"protocol at {p['ratio']:.0%} of FFN neurons removed, on {_LABEL[m]}; smallest effect of interest "
              f"(sesoi) {sesoi:g} point(s). Verdict rule: `benefit` if the 95% interval lies above 0, `no_benefit` if "
              f"it lies below sesoi, else `inconclusive`; a failing gate or norm-only not beating random makes it "
              "`inconclusive`.", "",
              f"Primary: {_ci(p)} ({p['n_calibration_draws']} calibration draws x {p['n_seeds']} head seeds, "
              f"Satterthwaite df {p['df']:.1f}; half-width {p['ci_half_width']:.2f}, "
              f"{'within' if p['powered'] else 'wider than'} sesoi; calibration-draw SD {p['calibration_draw_sd']:.2f}).",
              "",
              f"Gate: removing every FFN neuron costs {g['headroom']:.2f} points, 95% CI [{g['headroom_ci95'][0]:.2f}, "
              f"{g['headroom_ci95'][1]:.2f}], paired SD {g['paired_sd']:.2f}; lower bound "
              f"{'>=' if g['passes'] else '<'} 2 x sesoi = {g['threshold']:g}: "
              f"{'passes' if g['passes'] else 'fails'}.", "",
              "Controls (positive favours the first-named method):", "",
              f"- norm-only minus random at {p['ratio']:.0%}: {_ci(c['norm_minus_random'])} "
              f"({'norm-only beats random: the testbed tells pruning criteria apart' if c['norm_beats_random'] else 'norm-only does not beat random'});",
              f"- shuffled protection (a random set of the protected size) minus norm-only: "
              f"{_ci(c['shuffled_protect_minus_baseline'])};",
              f"- speaker neurons (calibration draw 0): {c['neuron_count']} against the 95th percentile "
              f"{c['neuron_count_null_p95']} of {c['permutations']} label permutations "
              f"({'above' if c['neurons_above_null'] else 'not above'} chance).", "",
              "Secondary comparisons (protected minus norm-only):", "",
              "| protocol | removed | diff [95% CI] | verdict |", "|---|---:|---|---|"]
    for sec in summary["secondary"]:
        lines.append(f"| {sec['protocol']} | {sec['ratio']:.0%} | {_ci(sec)} | {sec['verdict']} |")
    lines += ["", "Clusters per calibration draw (speaker consistency: share of a speaker's items in its most common "
              "cluster; pitch class estimated from median F0, < 165 Hz 'low'; chance levels from shuffled labels):",
              "", "| draw | speaker neurons | null p95 | i-vector consistency (chance) | i-vector pitch purity (chance) "
              "| speaker-like | SSL-frame consistency (chance) |", "|---:|---:|---:|---|---|---|---|"]
    for d in controls.get("per_draw", []):
        iv, fr = d["clusters"]["ivector"], d["clusters"]["ssl_frames"]
        lines.append(f"| {d['draw']} | {d['neuron_count']} | {d['null_p95']:.0f} | {iv['speaker_consistency']} "
                     f"({iv['speaker_consistency_chance']}) | {iv['pitch_class_purity']} "
                     f"({iv['pitch_class_purity_chance']}) | {'yes' if iv['speaker_like'] else 'no'} | "
                     f"{fr['speaker_consistency']} ({fr['speaker_consistency_chance']}) |")
    not_like = [d["draw"] for d in controls.get("per_draw", []) if not d["clusters"]["ivector"]["speaker_like"]]
    if not_like:
        lines += ["", f"The i-vector clusters of draw(s) {not_like} are **not speaker-like** (speakers split across "
                  "clusters): the 'speaker neurons' of those draws are neurons specific to acoustic clusters, "
                  "not to speakers."]
    ssl = controls.get("ssl_stage")
    if ssl:
        lines += ["", f"SSL-stage budget: {ssl['budget']['steps']} continued-pretraining steps per pruned upstream "
                  f"(peak lr {ssl['budget']['lr']:g}), pretraining heads fitted for {ssl['budget']['head_steps']} steps "
                  f"on the frozen unpruned upstream (final loss {ssl['heads']['final_loss']:.3f}); final loss per run: "
                  + ", ".join(f"{r['method']}{'' if r['calibration_draw'] is None else ' d' + str(r['calibration_draw'])}"
                              f" {r['final_loss']:.3f}" for r in ssl["runs"]) + "."]
    lines += ["", "Every method (mean ± SD over all its rows):", "", *_method_table(rows)]
    if run:
        lines += ["", f"Log-mel mean/std baseline on the same unseen-speaker trials: EER {run['logmel_eer']:.2f}%. "
                  f"Total time {run['minutes']:.1f} min."]
    lines += _attempts(out)
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    plot_metric(rows, m, out / f"{m}_vs_ratio.png")
    return path


def plot_metric(rows: list[dict], metric: str, path: Path) -> Path:
    """Mean ± std over seeds of ``metric`` against the removed share, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = [r for r in rows if r.get("protocol", "superb") == "superb"]
    groups = _groups(rows)
    for label, method, color in (("norm-only", "baseline", "tab:blue"), ("protected", "protected", "tab:red"),
                                 ("shuffled protect", "shuffled_protect", "tab:orange"), ("random", "random", "tab:gray")):
        pts = sorted((k[2], *mean_std([r[metric] for r in rs])) for k, rs in groups.items() if k[0] == method)
        if pts:
            x, mu, sd = map(np.array, zip(*pts))
            ax.errorbar(x, mu, yerr=sd, marker="o", capsize=3, color=color, label=label)
    for method, ls in (("unpruned", ":"), ("all_ffn", "--")):
        rs = groups.get((method, None, 0.0 if method == "unpruned" else 1.0))
        if rs:
            ax.axhline(mean_std([r[metric] for r in rs])[0], color="k", ls=ls,
                       label="unpruned" if method == "unpruned" else "all FFN removed")
    ax.set_xlabel("fraction of FFN neurons removed")
    ax.set_ylabel(_LABEL[metric])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
