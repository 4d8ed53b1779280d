"""i-vectors: diagonal GMM-UBM, Baum-Welch statistics, total-variability matrix by EM.

There is no well-kept Python i-vector library, so this is a small, tested implementation of
the standard recipe (Dehak et al. 2011; Kenny's EM for T):

1. MFCC + deltas (``training.data.features.mfcc``, kaldi-native-fbank);
2. a diagonal-covariance GMM-UBM trained by EM (k-means initialisation with FAISS);
3. per utterance zeroth- and centred first-order Baum-Welch statistics;
4. the total-variability matrix T (C*F x R) trained by EM on those statistics;
5. the i-vector: the posterior mean of w, ``L^-1 T' S^-1 F`` with ``L = I + sum_c N_c T_c' S_c^-1 T_c``;
6. optional LDA (with speaker labels) and length normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DiagGMM", "train_ubm", "baum_welch", "IVectorExtractor", "lda", "length_norm"]


@dataclass
class DiagGMM:
    """Diagonal-covariance Gaussian mixture: weights (C,), means (C, F), variances (C, F)."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    def log_likelihoods(self, x: np.ndarray) -> np.ndarray:
        """Per-component joint log-likelihoods log w_c + log N(x | c): (T, F) -> (T, C)."""
        inv = 1.0 / self.variances  # (C, F)
        const = np.log(self.weights) - 0.5 * (np.log(2 * np.pi * self.variances).sum(1))  # (C,)
        # -0.5 * sum_f (x - mu)^2 / var, expanded to matrix products
        quad = (x ** 2) @ inv.T - 2 * x @ (self.means * inv).T + (self.means ** 2 * inv).sum(1)  # (T, C)
        return const - 0.5 * quad

    def posteriors(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """Component posteriors (T, C) and the mean frame log-likelihood."""
        ll = self.log_likelihoods(x)
        m = ll.max(1, keepdims=True)
        p = np.exp(ll - m)
        s = p.sum(1, keepdims=True)
        return p / s, float((np.log(s) + m).mean())


def train_ubm(frames: np.ndarray, n_components: int = 64, iterations: int = 10, seed: int = 0,
              var_floor: float = 1e-3) -> DiagGMM:
    """EM for a diagonal GMM on (N, F) frames, initialised by k-means."""
    import faiss

    frames = np.ascontiguousarray(frames, dtype=np.float32)
    if len(frames) < n_components * 2:
        raise ValueError(f"{len(frames)} frames are too few for a {n_components}-component UBM")
    km = faiss.Kmeans(frames.shape[1], n_components, niter=15, seed=seed)
    km.train(frames)
    means = km.centroids.astype(np.float64)
    global_var = frames.var(0).astype(np.float64)
    gmm = DiagGMM(np.full(n_components, 1.0 / n_components), means, np.tile(global_var, (n_components, 1)))
    x = frames.astype(np.float64)
    for _ in range(iterations):
        post, _ = gmm.posteriors(x)  # (N, C)
        n = post.sum(0) + 1e-10  # (C,)
        mu = (post.T @ x) / n[:, None]
        var = (post.T @ (x ** 2)) / n[:, None] - mu ** 2
        gmm = DiagGMM(n / n.sum(), mu, np.maximum(var, var_floor * global_var))
    return gmm


def baum_welch(gmm: DiagGMM, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zeroth-order (C,) and centred first-order (C, F) statistics of one utterance's frames (T, F)."""
    post, _ = gmm.posteriors(x.astype(np.float64))  # (T, C)
    n = post.sum(0)  # (C,)
    f = post.T @ x - n[:, None] * gmm.means  # (C, F)
    return n, f


class IVectorExtractor:
    """Total-variability model: T (C, F, R) on a UBM; ``fit`` by EM, ``transform`` to i-vectors."""

    def __init__(self, ubm: DiagGMM, rank: int = 100, seed: int = 0):
        self.ubm = ubm
        self.rank = rank
        c, f = ubm.means.shape
        rng = np.random.default_rng(seed)
        # initialise with the scale of the UBM's standard deviations
        self.T = rng.standard_normal((c, f, rank)) * np.sqrt(ubm.variances)[:, :, None] * 0.1  # (C, F, R)

    def _precision_terms(self) -> np.ndarray:
        inv = 1.0 / self.ubm.variances  # (C, F)
        return np.einsum("cfr,cf,cfs->crs", self.T, inv, self.T)  # (C, R, R): T_c' S_c^-1 T_c

    def _posterior(self, n: np.ndarray, f: np.ndarray, tst: np.ndarray, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean (R,) and covariance (R, R) of w for one utterance's statistics."""
        L = np.eye(self.rank) + np.einsum("c,crs->rs", n, tst)  # (R, R)
        cov = np.linalg.inv(L)
        b = np.einsum("cfr,cf->r", self.T, inv * f)  # (R,)
        return cov @ b, cov

    def fit(self, stats: list[tuple[np.ndarray, np.ndarray]], iterations: int = 5) -> "IVectorExtractor":
        """EM for T on per-utterance (N, F) statistics."""
        if len(stats) < 2:
            raise ValueError(f"need statistics of at least 2 utterances to train T, got {len(stats)}")
        inv = 1.0 / self.ubm.variances
        c_dim, f_dim, r = self.T.shape
        for _ in range(iterations):
            tst = self._precision_terms()
            acc_a = np.zeros((c_dim, r, r))  # sum_u N_uc E[w w']
            acc_c = np.zeros((c_dim, f_dim, r))  # sum_u F_uc E[w]'
            for n, f in stats:
                w, cov = self._posterior(n, f, tst, inv)
                eww = cov + np.outer(w, w)
                acc_a += n[:, None, None] * eww[None]
                acc_c += f[:, :, None] * w[None, None, :]
            self.T = np.linalg.solve(acc_a, acc_c.transpose(0, 2, 1)).transpose(0, 2, 1)  # T_c = C_c A_c^-1
        return self

    def transform(self, stats: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """i-vectors (N, R) of per-utterance statistics."""
        tst = self._precision_terms()
        inv = 1.0 / self.ubm.variances
        return np.stack([self._posterior(n, f, tst, inv)[0] for n, f in stats])


def lda(x: np.ndarray, labels: list[str], dim: int) -> np.ndarray:
    """LDA projection (R, dim) maximising between- over within-speaker scatter."""
    from scipy.linalg import eigh

    classes = sorted(set(labels))
    if dim >= len(classes):
        raise ValueError(f"LDA dim {dim} must be below the number of speakers {len(classes)}")
    lab = np.array(labels)
    mu = x.mean(0)
    sw = np.zeros((x.shape[1], x.shape[1]))
    sb = np.zeros_like(sw)
    for c in classes:
        xc = x[lab == c]
        mc = xc.mean(0)
        sw += (xc - mc).T @ (xc - mc)
        sb += len(xc) * np.outer(mc - mu, mc - mu)
    vals, vecs = eigh(sb, sw + 1e-6 * np.eye(len(sw)))
    return vecs[:, np.argsort(vals)[::-1][:dim]]


def length_norm(x: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Centre (by ``mean``, default x's own) and scale every row to unit length."""
    x = x - (x.mean(0) if mean is None else mean)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def main(argv: list[str] | None = None) -> int:
    """i-vector speaker verification on a corpus: train on its training split, score its trials.

        .venv/bin/python -m training.compression.ivector --corpus corpus [--components 64] [--rank 100] [--lda 50]
    """
    import argparse
    import json
    import sys

    from models.evaluation import score_trials
    from training.common import load_split
    from training.data.corpus import read_scp
    from training.data.features import mfcc

    ap = argparse.ArgumentParser(prog="python -m training.compression.ivector", description=main.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--components", type=int, default=64)
    ap.add_argument("--rank", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--lda", type=int, default=50, help="LDA dimension (0: none)")
    ap.add_argument("--train-utts", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from pathlib import Path

    try:
        rng = np.random.default_rng(args.seed)
        train_all = sorted(read_scp(Path(args.corpus) / "train" / "wav.scp"))
        pick = sorted(rng.choice(train_all, min(args.train_utts, len(train_all)), replace=False))
        utts, waves, utt2spk = load_split(args.corpus, "train", pick, progress=False)
        eval_utts, eval_waves, _ = load_split(args.corpus, "eval", progress=False)
        from models.evaluation import read_trials

        trials = read_trials(Path(args.corpus) / "eval" / "trials")
    except (FileNotFoundError, ValueError) as e:
        print(f"ivector: {e}", file=sys.stderr)
        return 2
    feats = [mfcc(w, cmn=False) for w in waves]
    allf = np.concatenate(feats)
    ubm = train_ubm(allf[rng.choice(len(allf), min(200_000, len(allf)), replace=False)], args.components, 10, args.seed)
    stats = [baum_welch(ubm, f) for f in feats]
    ext = IVectorExtractor(ubm, args.rank, args.seed).fit(stats, args.iterations)
    train_iv = ext.transform(stats)
    eval_iv = ext.transform([baum_welch(ubm, mfcc(w, cmn=False)) for w in eval_waves])
    mean = train_iv.mean(0)
    out = {"plain": score_trials(dict(zip(eval_utts, length_norm(eval_iv, mean))), trials).eer}
    if args.lda:
        speakers = [utt2spk[u] for u in utts]
        proj = lda(length_norm(train_iv, mean), speakers, min(args.lda, len(set(speakers)) - 1))
        out["lda"] = score_trials(dict(zip(eval_utts, length_norm(length_norm(eval_iv, mean) @ proj))), trials).eer
    print(json.dumps({"eer_percent": out, "components": args.components, "rank": args.rank,
                      "train_utterances": len(utts), "eval_utterances": len(eval_utts)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
