"""The results page of the published-protocol experiment: ``results.md`` and its plots.

The page states the sensitivity gate's verdict first, in words, before any comparison: when
the testbed cannot discriminate, the comparisons below it are reported but say nothing about
the method.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.stats import HIGHER_IS_BETTER, GateError, gate, mean_std

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


def write_results_page(rows: list[dict], summary: dict, out: Path) -> Path:
    """Write ``results.md`` (gate verdict, table of means ± std over seeds, comparisons, overlaps) and plots."""
    m = summary["metric"]
    verdict = ("**The testbed can discriminate**" if summary["testable"] else
               "**The testbed cannot discriminate between pruning methods**")
    lines = [
        "# Compression experiment: the published protocol (prune the SSL upstream, retrain the downstream)", "",
        f"{verdict}: removing every FFN neuron costs {summary['headroom']:.2f} points of {_LABEL[m]} against a "
        f"seed-to-seed standard deviation of {summary['noise']:.2f} (gate: headroom >= {summary['gate_factor']:g} x "
        f"noise; measured ratio {summary['headroom'] / max(summary['noise'], 1e-12):.1f}).",
        "" if summary["testable"] else
        "Differences between pruning methods below are therefore not evidence for or against protection.", "",
        f"The same gate on every metric (the verdict above uses {m}): {_gates(rows, summary['gate_factor'])}.", "",
        "Run with `--gate-only`: the controls and the gate only, no pruned upstreams.\n" if summary.get("gate_only") else "",
        f"Downstream audio passed through the `{summary['data']['condition']}` channel.\n"
        if summary.get("data", {}).get("condition") else "",
        f"Log-mel mean/std baseline on the same unseen-speaker trials: EER {summary['logmel_eer']:.2f}%; the unpruned "
        f"SSL upstream with its downstream {'beats' if summary['ssl_beats_logmel'] else 'does not beat'} it.", "",
        f"Speaker neurons per layer {summary['speaker_neurons']} of {summary['ffn_widths']}; with randomly shuffled "
        f"i-vector clusters the same statistics mark {summary['speaker_neurons_shuffled']} (chance level).", "",
        f"Seeds: {summary['seeds']} heads per upstream (random pruning: {summary['random_seeds']} draws). "
        f"Total time {summary['minutes']:.1f} min.", "",
        "| method | variant | removed | SID acc % | EER % | minDCF | params | RTF | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (method, variant, ratio), rs in _groups(rows).items():
        cells = []
        for k, fmt in (("sid_acc", "{:.1f} ± {:.1f}"), ("eer", "{:.2f} ± {:.2f}"), ("mindcf", "{:.3f} ± {:.3f}")):
            cells.append(fmt.format(*mean_std([r[k] for r in rs])))
        lines.append(f"| {method} | {variant or ''} | {ratio:.0%} | {' | '.join(cells)} | {rs[0]['params']:,} | "
                     f"{np.mean([r['rtf'] for r in rs]):.4f} | {len(rs)} |")
    lines += ["", f"Paired differences, protected minus norm-only ({_LABEL[m]}; mean over seeds, 95% t interval):", "",
              "| removed | once | 95% CI | recompute per layer | 95% CI |", "|---:|---:|---|---:|---|"]
    for a, b in zip(summary["comparisons"], summary["comparisons_recompute"]):
        lines.append(f"| {a['ratio']:.0%} | {a['protected_minus_baseline']:+.2f} | [{a['ci95'][0]:+.2f}, {a['ci95'][1]:+.2f}] | "
                     f"{b['protected_minus_baseline']:+.2f} | [{b['ci95'][0]:+.2f}, {b['ci95'][1]:+.2f}] |")
    lines += ["", "Overlap (Jaccard, mean over layers) of the neurons each method keeps:", "",
              "| removed | norm-only vs protected once | norm-only vs recompute | once vs recompute | norm-only vs random |",
              "|---:|---:|---:|---:|---:|"]
    for o in summary["kept_overlap_jaccard"]:
        rnd = f"{o['baseline_vs_random']:.3f}" if o["baseline_vs_random"] is not None else "-"
        lines.append(f"| {o['ratio']:.0%} | {o['baseline_vs_protected_once']:.3f} | "
                     f"{o['baseline_vs_protected_recompute']:.3f} | {o['protected_once_vs_recompute']:.3f} | {rnd} |")
    lines += ["", "Where speaker information lives: linear-probe SID accuracy (%) per hidden state "
              "(0 = CNN features) of each upstream's mean-pooled features:", ""]
    for name, acc in summary["layer_probe_sid_acc"].items():
        lines.append(f"- {name}: {acc}")
    weights = {}
    for r in rows:
        if r["method"] in ("unpruned", "all_ffn"):
            weights.setdefault(r["method"], []).append(r["layer_weights"])
    lines += ["", "Layer weights the downstream learned (mean over seeds):", ""]
    for k, w in weights.items():
        lines.append(f"- {k}: {np.round(np.mean(w, 0), 3).tolist()}")
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
    groups = _groups(rows)
    for label, (method, variant), color in (("norm-only", ("baseline", None), "tab:blue"),
                                            ("protected (once)", ("protected", "once"), "tab:red"),
                                            ("protected (recompute)", ("protected", "recompute"), "tab:orange"),
                                            ("random", ("random", None), "tab:gray")):
        pts = sorted((k[2], *mean_std([r[metric] for r in rs])) for k, rs in groups.items() if k[:2] == (method, variant))
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
