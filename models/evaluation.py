"""Speaker verification and identification scoring: EER, minDCF, DET curves, identification.

    python -m models.evaluation --trials trials --embeddings emb.npz [--det det.png]

``trials`` is a Kaldi-style list (``enroll_utt test_utt target|nontarget`` per line);
``emb.npz`` maps utterance ids to embeddings. Scores are cosine similarities. Only numpy is
needed (matplotlib for the DET plot), so the exporter can calibrate thresholds with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["VerificationResult", "roc", "eer", "min_dcf", "evaluate_scores", "score_trials", "read_trials",
           "identification_accuracy", "plot_det", "cosine_scores"]


@dataclass
class VerificationResult:
    """Verification figures of a trial list."""

    eer: float  # percent
    eer_threshold: float
    min_dcf_01: float  # normalised minDCF at p_target = 0.01
    min_dcf_05: float  # normalised minDCF at p_target = 0.05
    n_target: int
    n_nontarget: int


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miss and false-alarm rates at every threshold.

    Args:
        scores: (N,) higher means more likely the same speaker.
        labels: (N,) 1 for target, 0 for non-target trials.

    Returns:
        (p_miss, p_fa, thresholds), each (N + 1,): accepting scores >= thresholds[i] gives
        p_miss[i] and p_fa[i]; the last entry accepts nothing.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be equal-length vectors")
    n_t, n_n = int(labels.sum()), int((~labels).sum())
    if n_t == 0 or n_n == 0:
        raise ValueError(f"need both target and non-target trials, got {n_t} target / {n_n} non-target")
    order = np.argsort(-scores, kind="mergesort")
    s, lab = scores[order], labels[order]
    # accept the top k trials, k = 0..N, never splitting tied scores
    tp = np.concatenate([[0], np.cumsum(lab)])  # (N+1,)
    fp = np.concatenate([[0], np.cumsum(~lab)])
    ks = np.concatenate([[0], np.flatnonzero(s[1:] != s[:-1]) + 1, [len(s)]])
    thresholds = np.concatenate([[np.inf], s])[ks]  # accept scores >= threshold
    p_miss = 1.0 - tp[ks] / n_t
    p_fa = fp[ks] / n_n
    # ordered by increasing threshold: p_miss rises, p_fa falls
    return p_miss[::-1], p_fa[::-1], thresholds[::-1]


def eer(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Equal error rate (fraction) and the score threshold where it is reached."""
    p_miss, p_fa, thr = roc(scores, labels)
    # p_miss rises and p_fa falls along the arrays; interpolate at the crossing
    diff = p_miss - p_fa
    i = int(np.flatnonzero(diff >= 0)[0])
    if i == 0 or diff[i] == 0:
        return float(p_miss[i]), float(thr[i] if np.isfinite(thr[i]) else np.max(scores))
    j = i - 1
    a = diff[j] / (diff[j] - diff[i])  # fraction of the way from j to i
    e = p_miss[j] + a * (p_miss[i] - p_miss[j])
    t_i = thr[i] if np.isfinite(thr[i]) else np.max(scores)
    t_j = thr[j] if np.isfinite(thr[j]) else np.max(scores)
    return float(e), float(t_j + a * (t_i - t_j))


def min_dcf(scores: np.ndarray, labels: np.ndarray, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Normalised minimum detection cost (NIST SRE definition)."""
    p_miss, p_fa, _ = roc(scores, labels)
    dcf = c_miss * p_target * p_miss + c_fa * (1 - p_target) * p_fa
    return float(dcf.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


def evaluate_scores(scores: np.ndarray, labels: np.ndarray) -> VerificationResult:
    """EER (percent), its threshold and minDCF at p_target 0.01 and 0.05."""
    e, t = eer(scores, labels)
    labels = np.asarray(labels).astype(bool)
    return VerificationResult(100.0 * e, t, min_dcf(scores, labels, 0.01), min_dcf(scores, labels, 0.05),
                              int(labels.sum()), int((~labels).sum()))


def read_trials(path: str | Path) -> list[tuple[str, str, int]]:
    """Trials, one per line: Kaldi-style ``utt_a utt_b target|nontarget`` (or 1/0), or the official
    VoxCeleb list format ``1|0 utt_a utt_b`` (label first)."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 3 and parts[0] in ("1", "0") and parts[2] not in ("target", "nontarget", "1", "0"):
            parts = [parts[1], parts[2], parts[0]]  # VoxCeleb: label, enrolment, test
        if len(parts) != 3 or parts[2] not in ("target", "nontarget", "1", "0"):
            raise ValueError(f"{path}:{n}: expected 'utt_a utt_b target|nontarget', got {line!r}")
        out.append((parts[0], parts[1], int(parts[2] in ("target", "1"))))
    return out


def cosine_scores(emb: dict[str, np.ndarray], trials: list[tuple[str, str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine score and label per trial; raises KeyError naming a missing utterance."""
    def unit(u: str) -> np.ndarray:
        if u not in emb:
            raise KeyError(f"trial utterance {u!r} has no embedding")
        v = np.asarray(emb[u], dtype=np.float64)
        return v / max(np.linalg.norm(v), 1e-12)

    scores = np.array([float(unit(a) @ unit(b)) for a, b, _ in trials])
    labels = np.array([lab for _, _, lab in trials])
    return scores, labels


def score_trials(emb: dict[str, np.ndarray], trials: list[tuple[str, str, int]]) -> VerificationResult:
    """Verification figures of embeddings on a trial list."""
    return evaluate_scores(*cosine_scores(emb, trials))


def identification_accuracy(enroll: dict[str, np.ndarray], tests: list[tuple[np.ndarray, str]]) -> float:
    """Closed-set identification accuracy (percent): each test embedding against speaker voiceprints.

    Args:
        enroll: speaker -> voiceprint.
        tests: (embedding, true speaker) pairs.
    """
    names = sorted(enroll)
    mat = np.stack([enroll[n] / np.linalg.norm(enroll[n]) for n in names])  # (S, D)
    hits = 0
    for vec, spk in tests:
        hits += names[int(np.argmax(mat @ (vec / np.linalg.norm(vec))))] == spk
    return 100.0 * hits / max(len(tests), 1)


def plot_det(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "DET") -> Path:
    """Draw DET curves (probit axes) of named (scores, labels) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from statistics import NormalDist

    ppf = np.vectorize(NormalDist().inv_cdf)
    lim = 0.0005
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (scores, labels) in curves.items():
        p_miss, p_fa, _ = roc(scores, labels)
        e = evaluate_scores(scores, labels).eer
        ax.plot(ppf(np.clip(p_fa, lim, 1 - lim)), ppf(np.clip(p_miss, lim, 1 - lim)), label=f"{name} (EER {e:.2f}%)")
    ticks = np.array([0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95])
    ax.set_xticks(ppf(ticks), [f"{100 * t:g}" for t in ticks])
    ax.set_yticks(ppf(ticks), [f"{100 * t:g}" for t in ticks])
    ax.set_xlabel("false alarm rate (%)")
    ax.set_ylabel("miss rate (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line scorer; prints JSON."""
    ap = argparse.ArgumentParser(prog="python -m models.evaluation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", required=True)
    ap.add_argument("--embeddings", required=True, help=".npz of utterance id -> embedding")
    ap.add_argument("--det", help="write a DET curve PNG here")
    args = ap.parse_args(argv)
    try:
        with np.load(args.embeddings) as z:
            emb = {k: z[k] for k in z.files}
        trials = read_trials(args.trials)
        scores, labels = cosine_scores(emb, trials)
        result = evaluate_scores(scores, labels)
    except (OSError, ValueError, KeyError) as e:
        print(f"evaluation failed: {e}", file=sys.stderr)
        return 2
    if args.det:
        plot_det({Path(args.embeddings).stem: (scores, labels)}, args.det)
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
