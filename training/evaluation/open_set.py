"""Open-set Identify on real speech: how often a stranger matches and an enrolled speaker is missed.

Part of ``training.evaluation.decisions``: collections of real evaluation speakers (3 clean utterances each), filled
beyond them with *simulated* voiceprints drawn from a Gaussian fitted to real calibration voiceprints, every probe
scored against every voiceprint as the service's Identify scores it (``llr_matrix``), with the collection-size rule
(LLR >= operating point + ln N) and the single-pair rule side by side.
"""

from __future__ import annotations

import numpy as np

from models.runtime import SpeakerModel
from training.evaluation.realembed import Rendered

__all__ = ["llr_matrix", "simulated_voiceprints", "open_set_identify", "simulation_check"]


def llr_matrix(scorer, probes: np.ndarray, probe_stats: np.ndarray, probe_speech: np.ndarray, prints: np.ndarray,
               print_stats: np.ndarray, print_speech: np.ndarray) -> np.ndarray:
    """(P, N) calibrated LLRs of every probe against every voiceprint, as the service scores each pair."""
    cos = probes @ prints.T  # (P, N)
    norm = 0.5 * ((cos - print_stats[None, :, 0]) / print_stats[None, :, 1]
                  + (cos - probe_stats[:, None, 0]) / probe_stats[:, None, 1])
    n_p, n_v = scorer.narrowband_flags(probe_stats), scorer.narrowband_flags(print_stats)
    b_p, b_v = scorer.bandlimited_flags(probe_stats), scorer.bandlimited_flags(print_stats)
    mism = n_p[:, None] != n_v[None, :]
    band = mism & (b_p[:, None] | b_v[None, :])
    return scorer.calibration.llr(norm, mism.astype(np.float64), np.minimum(probe_speech[:, None], print_speech[None, :]),
                                  band.astype(np.float64))


def simulated_voiceprints(real: np.ndarray, n: int, rng: np.random.Generator, shrink: float = 0.5) -> np.ndarray:
    """(n, D) unit vectors from a Gaussian fitted to (K, D) unit ``real`` voiceprints.

    The covariance is the sample covariance shrunk by ``shrink`` towards the identity scaled to
    the same total variance (K voiceprints cannot estimate a D x D covariance on their own).
    """
    mu = real.mean(axis=0)
    centred = real - mu
    cov = centred.T @ centred / max(len(real) - 1, 1)  # (D, D)
    d = real.shape[1]
    cov = (1 - shrink) * cov + shrink * np.eye(d) * np.trace(cov) / d
    draws = rng.multivariate_normal(mu, cov, size=n, method="cholesky")
    return (draws / np.linalg.norm(draws, axis=1, keepdims=True)).astype(np.float32)


def open_set_identify(model: SpeakerModel, clean: Rendered, spk: np.ndarray, sizes: list[int], distractors: np.ndarray,
                      rng: np.random.Generator, draws: int = 10, real_enrolled: int = 10) -> dict:
    """Stranger false-match and true-match miss rates of Identify for collections of ``sizes`` speakers."""
    scorer = model.scorer
    op = scorer.threshold
    speakers = sorted(set(spk.tolist()))
    if len(speakers) < 2:
        raise ValueError("open-set Identify needs at least two speakers (enrolled and strangers)")
    out = {}
    dstats = scorer.stats(distractors) if len(distractors) else np.zeros((0, 3))
    for n in sizes:
        k = max(1, min(n, real_enrolled, len(speakers) - 1))  # at least one speaker left as the strangers
        fm_open = fm_single = miss_open = miss_single = stranger_total = genuine_total = 0
        for _ in range(draws):
            enrolled = rng.choice(speakers, size=k, replace=False)
            prints, owners, enrolled_rows, speech = [], [], set(), []
            for s in enrolled:
                rows = np.flatnonzero((spk == s) & clean.ok)
                pick = rng.choice(rows, size=min(3, len(rows) - 1), replace=False)
                enrolled_rows.update(pick.tolist())
                v = clean.emb[pick].astype(np.float64).sum(axis=0)
                prints.append(v / np.linalg.norm(v))
                owners.append(s)
                speech.append(float(clean.speech[pick].sum()))
            filler = n - k
            vp = np.stack(prints).astype(np.float32)
            st = scorer.stats(vp)
            if filler > 0:
                pick = rng.choice(len(distractors), size=filler, replace=len(distractors) < filler)
                vp = np.concatenate([vp, distractors[pick]])
                st = np.concatenate([st, dstats[pick]])
                speech += [float(np.median(speech))] * filler
                owners += [""] * filler
            owners_a, speech_a = np.array(owners), np.array(speech)
            probes = np.array([i for i in np.flatnonzero(clean.ok) if i not in enrolled_rows])
            llr = llr_matrix(scorer, clean.emb[probes], scorer.stats(clean.emb[probes]), clean.speech[probes],
                             vp, st, speech_a)  # (P, N)
            best = llr.argmax(axis=1)
            top = llr[np.arange(len(probes)), best]
            genuine = np.isin(spk[probes], enrolled)
            right = owners_a[best] == spk[probes]
            for rule, thr in (("open", op + np.log(n)), ("single", op)):
                match = top >= thr
                fm = int((match & ~genuine).sum())
                miss = int((genuine & ~(match & right)).sum())
                if rule == "open":
                    fm_open, miss_open = fm_open + fm, miss_open + miss
                else:
                    fm_single, miss_single = fm_single + fm, miss_single + miss
            stranger_total += int((~genuine).sum())
            genuine_total += int(genuine.sum())
        out[str(n)] = {"enrolled_real": k, "simulated": max(n - k, 0), "threshold_open_set": round(op + np.log(n), 3),
                       "stranger_false_match": round(fm_open / max(stranger_total, 1), 4),
                       "true_match_miss": round(miss_open / max(genuine_total, 1), 4),
                       "stranger_false_match_single_pair_rule": round(fm_single / max(stranger_total, 1), 4),
                       "true_match_miss_single_pair_rule": round(miss_single / max(genuine_total, 1), 4),
                       "stranger_probes": stranger_total, "genuine_probes": genuine_total}
    return out


def simulation_check(model, clean: Rendered, spk: np.ndarray, distractors: np.ndarray) -> dict:
    """Stranger-probe LLRs against simulated voiceprints vs against real other speakers' voiceprints."""
    speakers = sorted(set(spk.tolist()))
    real = []
    for s in speakers:
        rows = np.flatnonzero((spk == s) & clean.ok)[:3]
        v = clean.emb[rows].astype(np.float64).sum(axis=0)
        real.append(v / np.linalg.norm(v))
    real = np.stack(real).astype(np.float32)
    rows = np.flatnonzero(clean.ok)
    pst = model.scorer.stats(clean.emb[rows])

    def llrs(prints: np.ndarray, own: np.ndarray | None) -> np.ndarray:
        llr = llr_matrix(model.scorer, clean.emb[rows], pst, clean.speech[rows], prints, model.scorer.stats(prints),
                         np.full(len(prints), 10.0))
        return llr[~own] if own is not None else llr.ravel()

    own = spk[rows][:, None] == np.array(speakers)[None, :]
    r, s = llrs(real, own), llrs(distractors[:200], None)
    return {"real_llr_mean": round(float(r.mean()), 2), "real_llr_p99": round(float(np.percentile(r, 99)), 2),
            "simulated_llr_mean": round(float(s.mean()), 2), "simulated_llr_p99": round(float(np.percentile(s, 99)), 2)}
