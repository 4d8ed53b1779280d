"""A sticky hidden Markov model over the diarization windows: who each window is, given who spoke around it.

Step 3 of ``models.diarization``. Clustering (``models.diarization_cluster``) labels each window
from its embedding alone; people speak in turns of several seconds, so a window's neighbours say
much about it. This is the idea of VBx (Landini et al., "Bayesian HMM clustering of x-vector
sequences (VBx) in speaker diarization", Computer Speech & Language 2022) with the simplest
emission model that needs nothing trained: each speaker is a direction on the unit sphere (a
von Mises-Fisher distribution of concentration ``kappa`` around the speaker's voiceprint), each
window is one step of a Markov chain over the speakers, and a step changes speaker with a small
probability inside a stretch of speech and a larger one across a pause (where turns usually
change hands). Starting from the clustering's labels, a few rounds of forward-backward give each
window's posterior over the speakers and re-estimate the voiceprints and the speakers' shares
from them (EM). VBx's PLDA needs thousands of training speakers, which no model served here
brings with it; the cosine model is what the embeddings themselves support.

Chosen on the real-speech pool's calibration conversations (BENCHMARKS.md, section 11g): against
the closest-voiceprint reassignment with a three-window median filter it replaced, confusion fell
on the calibration and on the evaluation speakers alike. Only numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sticky_hmm"]


def sticky_hmm(x: np.ndarray, pause: np.ndarray, labels: np.ndarray, k: int, kappa: float, switch: float,
               pause_switch: float, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """((N,) labels in 0..k-1, (N, k) posteriors) of (N, D) unit window embeddings ``x``, refined from the
    clustering's ``labels``.

    Args:
        x: window embeddings in time order.
        pause: (N,) bool, True where window n starts after window n-1 ended (a pause lies between them).
        labels: (N,) the clustering's labels, 0..k-1: the first posterior.
        k: the number of speakers.
        kappa: concentration of each speaker's embeddings around their voiceprint (cosine scale).
        switch: probability that the speaker changes from one window to the next inside a stretch of speech.
        pause_switch: the same across a pause.
        iters: rounds of forward-backward and re-estimation.

    A change of speaker goes to each speaker in proportion to their share of the windows (itself
    included), as in VBx. A speaker can lose every window; the caller decides what that means. The
    posterior of a window's own label is its ``confidence``: on the calibration conversations it told
    right from wrong turns better than the margin between the two closest voiceprints (section 11g).
    """
    n = len(x)
    if k < 2 or n < 2:
        return labels, np.eye(max(k, 1))[labels]
    x = x.astype(np.float64)
    gamma = np.eye(k)[labels]  # (N, k) posterior of each window's speaker
    p = np.where(pause, pause_switch, switch)  # (N,) p[t]: change between window t-1 and t
    for _ in range(iters):
        prints = gamma.T @ x  # (k, D)
        prints /= np.maximum(np.linalg.norm(prints, axis=1, keepdims=True), 1e-12)
        share = gamma.sum(axis=0) / n + 1e-9  # (k,)
        loglik = kappa * (x @ prints.T)  # (N, k)
        lik = np.exp(loglik - loglik.max(axis=1, keepdims=True))  # (N, k), each row scaled to a max of 1
        gamma = _posteriors(lik, share, p)
    return gamma.argmax(axis=1), gamma


def _posteriors(lik: np.ndarray, share: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(N, k) posteriors of the chain by scaled forward-backward: (N, k) emission likelihoods ``lik``, (k,) ``share``
    where a change goes, (N,) ``p`` the change probability into each step."""
    n, k = lik.shape
    alpha = np.empty((n, k))
    scale = np.empty(n)
    a = share * lik[0]
    scale[0] = a.sum()
    alpha[0] = a / scale[0]
    for t in range(1, n):
        a = ((1.0 - p[t]) * alpha[t - 1] + p[t] * share) * lik[t]  # alpha[t-1] sums to 1
        scale[t] = a.sum()
        alpha[t] = a / scale[t]
    beta = np.empty((n, k))
    beta[-1] = 1.0
    for t in range(n - 2, -1, -1):
        b = lik[t + 1] * beta[t + 1]  # (k,)
        beta[t] = ((1.0 - p[t + 1]) * b + p[t + 1] * (share @ b)) / scale[t + 1]
    gamma = alpha * beta
    return gamma / gamma.sum(axis=1, keepdims=True)
