"""Clustering of diarization window embeddings: the number of speakers and who each window is.

Step 2 of ``models.diarization`` (its module docstring tells the whole pipeline and how these
rules were chosen): average-linkage AHC on cosine distance of recording-centred embeddings,
the count by the normalised maximum eigengap of a pruned graph (NME-SC), small clusters folded
into larger ones, and the one-voice check on raw voiceprints. Only numpy and scipy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from models.diarization import DiarizationOptions

__all__ = ["MAX_GRAPH_ITEMS", "MAX_TREE_ITEMS", "cluster", "estimate_speakers", "graph_items", "voiceprints",
           "centered"]

MAX_TREE_ITEMS = 2000  # the tree's distance matrix holds MAX_TREE_ITEMS**2 / 2 doubles (16 MB)
MAX_GRAPH_ITEMS = 1000  # the eigengap's graph: MAX_GRAPH_ITEMS**2 doubles (8 MB) and one eigensolve per pruning
MIN_NEIGHBOURS = 2  # edges kept per item at least, whatever the pruning
MIN_GRAPH_ITEMS = 80  # fewer distinct windows (about 40 s of speech): the tree's fixed cut estimates the count
PRUNINGS = (0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25)  # shares of each row's closest items kept in the graph


def voiceprints(emb: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, D) unit mean of each label's window embeddings."""
    out = np.zeros((k, emb.shape[1]), np.float64)
    np.add.at(out, labels, emb.astype(np.float64))
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def centered(emb: np.ndarray) -> np.ndarray:
    """(N, D) unit embeddings less their recording mean: what the speakers of one recording do not share."""
    x = emb.astype(np.float64) - emb.astype(np.float64).mean(axis=0)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _cosine_distances(items: np.ndarray) -> np.ndarray:
    """Condensed cosine distances of (M, D) centred embeddings, defined for zero rows too.

    A window equal to the recording's mean centres to zero (every window, when the audio repeats
    exactly): it is at distance 0 from another zero row and 1 (cosine 0) from the rest, where
    scipy's cosine metric would give NaN and the tree would fail.
    """
    from scipy.spatial.distance import pdist

    zero = np.linalg.norm(items, axis=1) < 1e-9  # (M,)
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = pdist(items, metric="cosine")  # (M * (M - 1) / 2,)
    if zero.any():
        i, j = np.triu_indices(len(items), k=1)  # the condensed order
        dist = np.where(zero[i] | zero[j], np.where(zero[i] & zero[j], 0.0, 1.0), dist)
    return np.clip(dist, 0.0, 2.0)


def _fold_small(cen: np.ndarray, labels: np.ndarray, seconds: np.ndarray, min_s: float, keep: int) -> np.ndarray:
    """Give the windows of clusters with under ``min_s`` of speech to the closest larger cluster (keeps >= ``keep``)."""
    k = int(labels.max()) + 1
    dur = np.bincount(labels, weights=seconds, minlength=k)  # (k,)
    order = np.argsort(-dur)
    big = order[:max(keep, int((dur >= min_s).sum()), 1)]
    small = ~np.isin(labels, big)
    if small.any():
        prints = voiceprints(cen, labels, k)  # (k, D)
        labels = labels.copy()
        labels[small] = big[(cen[small] @ prints[big].T).argmax(axis=1)]
    return _relabel(labels)[0]


DISTINCT_COSINE = 0.97  # windows this close to one kept before are copies of it (repeated audio)


def _distinct(x: np.ndarray, same: float | None = None) -> np.ndarray:
    """(M, D) unit rows less near-copies (cosine >= ``same`` to a row kept before): repeated audio, such as a
    prompt played again, gives identical windows, which would fill each other's neighbour lists."""
    same = DISTINCT_COSINE if same is None else same
    copy = np.zeros(len(x), bool)  # (M,) near-copy of a row kept before
    for i in range(len(x)):
        if not copy[i]:
            copy[i + 1:] |= x[i + 1:] @ x[i] >= same
    return x[~copy]


def graph_items(cen: np.ndarray) -> np.ndarray:
    """The (M, D) windows the eigengap looks at: every r-th of (N, D) ``cen`` (at most ``MAX_GRAPH_ITEMS``;
    averaged runs would blend turns), near-copies dropped."""
    return _distinct(cen[::-(-len(cen) // MAX_GRAPH_ITEMS)])


def estimate_speakers(x: np.ndarray, lo: int, hi: int) -> int:
    """The number of speakers of (M, D) recording-centred unit embeddings (``graph_items``) by the normalised
    maximum eigengap.

    For each pruning p (``PRUNINGS``), every row keeps its ``p * N`` most similar items (cosine) as
    edges of weight 1, the graph is made symmetric, and the eigenvalues of its Laplacian are found;
    the largest gap between consecutive eigenvalues (over its largest one) says how many groups
    the graph falls into. The pruning with the smallest ``p / gap`` (the clearest structure for the
    fewest edges) gives the number of groups (up to 16, or ``hi`` when more), held to ``lo..hi``.
    """
    n = len(x)
    top = min(max(hi, 16), n - 1)  # groups looked for (then held to lo..hi)
    if top < 1:
        return max(1, min(lo, hi))
    sim = x @ x.T  # (M, M)
    best = (np.inf, 1)
    for p in PRUNINGS:
        keep = min(n, max(MIN_NEIGHBOURS, int(round(p * n))))
        adj = np.zeros_like(sim)
        np.put_along_axis(adj, np.argpartition(-sim, keep - 1, axis=1)[:, :keep], 1.0, axis=1)
        adj = (adj + adj.T) / 2
        eig = np.linalg.eigvalsh(np.diag(adj.sum(axis=1)) - adj)  # (M,) ascending
        gaps = np.diff(eig[:top + 1]) / max(float(eig[-1]), 1e-12)  # gaps[i]: after i + 1 groups
        k = int(np.argmax(gaps)) + 1
        ratio = p / max(float(gaps[k - 1]), 1e-12)
        if ratio < best[0]:
            best = (ratio, k)
    return min(max(best[1], lo), hi)


def _one_voice(emb: np.ndarray, labels: np.ndarray, one_speaker_cosine: float) -> bool:
    """Whether even the two most different clusters' voiceprints (raw embeddings) have cosine >= the bound."""
    k = int(labels.max()) + 1
    prints = voiceprints(emb, labels, k)  # (k, D)
    return bool((prints @ prints.T).min() >= one_speaker_cosine)


def cluster(emb: np.ndarray, seconds: np.ndarray, opts: DiarizationOptions) -> tuple[np.ndarray, int]:
    """Speaker labels of (N, D) unit window embeddings of one recording: ((N,) labels in 0..k-1, k).

    Args:
        emb: window embeddings.
        seconds: (N,) speech in each window (clusters are sized by their speech).
        opts: the number of speakers, or its bounds.
    """
    n = len(emb)
    if n == 0:
        return np.zeros(0, np.int64), 0
    if n == 1:
        return np.zeros(1, np.int64), 1
    from scipy.cluster.hierarchy import fcluster, linkage

    cen = centered(emb)  # (N, D)
    items = cen[::-(-n // MAX_TREE_ITEMS)]  # (M, D): every r-th window when there are too many for the tree
    tree = linkage(_cosine_distances(items), method="average")

    def spread(sub: np.ndarray) -> np.ndarray:
        """(N,) labels of all windows from the (M,) labels of the tree's: each to its closest cluster."""
        if len(items) == n:
            return sub
        prints = voiceprints(items, sub, int(sub.max()) + 1)  # (k, D)
        return (cen @ prints.T).argmax(axis=1)

    def cut(k: int) -> np.ndarray:
        return spread(fcluster(tree, t=min(k, len(items)), criterion="maxclust").astype(np.int64) - 1)

    if opts.num_speakers is not None:
        return _relabel(cut(opts.num_speakers))
    lo, hi = min(opts.min_speakers, n), min(opts.max_speakers, n)
    graph = graph_items(cen)  # (G, D)
    if len(graph) >= MIN_GRAPH_ITEMS:
        labels = _relabel(cut(estimate_speakers(graph, lo, hi)))[0]
        min_s, one_voice = opts.min_speaker_s, opts.one_speaker_cosine
    else:  # too few windows for the eigengap: the tree's fixed cut
        labels = _relabel(spread(fcluster(tree, t=opts.stop_distance, criterion="distance").astype(np.int64) - 1))[0]
        min_s, one_voice = opts.short_min_speaker_s, opts.short_one_speaker_cosine
    labels = _fold_small(cen, labels, seconds, min_s, lo)
    if lo == 1 and labels.max() > 0 and _one_voice(emb, labels, one_voice):
        labels = np.zeros(n, np.int64)
    k = int(labels.max()) + 1
    if not lo <= k <= hi:  # outside the caller's bounds: the tree's cut at the nearest bound
        labels = cut(min(max(k, lo), hi))
    return _relabel(labels)


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 0..k-1 by first appearance; (labels, k)."""
    order = {}
    out = np.empty_like(labels)
    for i, v in enumerate(labels.tolist()):
        out[i] = order.setdefault(v, len(order))
    return out, len(order)
