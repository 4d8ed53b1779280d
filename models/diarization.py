"""Speaker diarization from window embeddings: who spoke when.

The steps after VAD and embedding, free of any server or framework (``service.diarize`` runs
them on the service's VAD, models and batcher; ``training.evaluation.diarization_eval`` scores them):

1. **Windows** (``speech_windows``): every speech region is cut into windows of
   ``window_s`` every ``hop_s``; a region shorter than a window is one window.
2. **Clustering** (``cluster``): the window embeddings less their recording mean (what the
   speakers of one recording share: channel, room, codec) are clustered by average-linkage
   agglomerative clustering on cosine distance (``scipy.cluster.hierarchy``), cut at the number of
   speakers. Not given, the number is estimated by the eigengap of a pruned affinity graph with
   its pruning chosen per recording (``estimate_speakers``: NME-SC, Park et al., "Auto-Tuning
   Spectral Clustering for Speaker Diarization Using Normalized Maximum Eigengap", IEEE SPL 2020);
   clusters of the cut with less than ``min_speaker_s`` of speech are given to the closest larger
   one; then, if even the two most different clusters' voiceprints (the mean of their *raw* window
   embeddings) have a cosine of ``one_speaker_cosine`` or more, the recording is one speaker
   (centring a one-speaker recording leaves only noise, which the eigengap splits; the raw
   voiceprints show it is one voice). On conversations of the real-speech pool's calibration
   speakers the eigengap replaced a fixed cut of the tree (DER 24.0% -> 17.9%; one distance
   cannot suit recordings whose channel pulls every voice together and clean ones alike), and
   single-speaker recordings cut from them stayed one speaker about as often (172 of 187, 175 before).
   ``min_speaker_s`` and ``one_speaker_cosine`` were chosen there, on the pooled DER of the
   conversations and of those single-speaker recordings (``training.evaluation.diarization_tune``
   prints that sweep; ``training.evaluation.diarization_eval`` measures both on speakers never
   used for tuning). Windows that are near-copies of one another
   (``DISTINCT_COSINE``: repeated audio) count once in the graph. Recordings with fewer than
   ``MIN_GRAPH_ITEMS`` distinct windows (about 40 s of speech) are too small a graph for the eigengap: their tree
   is cut at a fixed ``stop_distance`` instead. Recordings with more windows than
   ``MAX_TREE_ITEMS`` build the tree on every r-th window (the others join the closest of its
   clusters), and the eigengap looks at every r-th window only (at most ``MAX_GRAPH_ITEMS``),
   which bounds memory and time.
3. **Resegmentation** (``resegment``): each window is re-assigned to the closest cluster
   voiceprint, labels are smoothed over neighbouring windows, every 10 ms frame of speech takes the
   label of the windows covering it (a tie goes to the closer voiceprint), runs of one label become
   segments, a speaker's segments closer than ``merge_gap_s`` are merged and segments shorter than
   ``min_segment_s`` are given to their neighbours.

Overlapped speech is not detected: where two people talk at once the frames go to one of them
(the other's longer turns around the overlap are kept). Only numpy and scipy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from models.vad import VadOptions

__all__ = ["FRAME_S", "DiarizationOptions", "Turn", "cluster", "diarization_vad", "diarize_embedded",
           "estimate_speakers", "graph_items", "resegment", "speakers_of", "speech_windows", "to_rttm"]

FRAME_S = 0.01
MAX_TREE_ITEMS = 2000  # the tree's distance matrix holds MAX_TREE_ITEMS**2 / 2 doubles (16 MB)
MAX_GRAPH_ITEMS = 1000  # the eigengap's graph: MAX_GRAPH_ITEMS**2 doubles (8 MB) and one eigensolve per pruning
MIN_NEIGHBOURS = 2  # edges kept per item at least, whatever the pruning
MIN_GRAPH_ITEMS = 80  # fewer distinct windows (about 40 s of speech): the tree's fixed cut estimates the count
PRUNINGS = (0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25)  # shares of each row's closest items kept in the graph


@dataclass(frozen=True)
class DiarizationOptions:
    """Diarization settings.

    Attributes:
        window_s, hop_s: embedding windows over the speech.
        num_speakers: the known number of speakers (None: estimated).
        min_speakers, max_speakers: bounds of the estimate.
        stop_distance, short_min_speaker_s, short_one_speaker_cosine: recordings too short for the
            eigengap: the cosine distance (of recording-centred embeddings) at which the tree stops
            merging, and the two rules above for them (tuned before the eigengap, on 12 conversations).
        min_speaker_s: an estimated cluster with less speech is given to the closest larger one.
        one_speaker_cosine: when even the two most different clusters' voiceprints (raw embeddings)
            have at least this cosine, the recording is one speaker.
        min_segment_s: shorter segments are given to their neighbours.
        merge_gap_s: a speaker's segments closer than this are joined.
        smooth: windows in the label median filter (odd; 1: none).
    """

    window_s: float = 1.0
    hop_s: float = 0.5
    num_speakers: int | None = None
    min_speakers: int = 1
    max_speakers: int = 16
    min_speaker_s: float = 7.5
    one_speaker_cosine: float = 0.87
    stop_distance: float = 0.95
    short_min_speaker_s: float = 10.0
    short_one_speaker_cosine: float = 0.81
    min_segment_s: float = 0.3
    merge_gap_s: float = 0.5
    smooth: int = 3

    def validate(self) -> DiarizationOptions:
        """ValueError naming the option for values out of range."""
        if self.num_speakers is not None and not 1 <= self.num_speakers <= 64:
            raise ValueError(f"num_speakers: must be in 1..64, got {self.num_speakers}")
        if not 1 <= self.min_speakers <= 64:
            raise ValueError(f"min_speakers: must be in 1..64, got {self.min_speakers}")
        if not 1 <= self.max_speakers <= 64:
            raise ValueError(f"max_speakers: must be in 1..64, got {self.max_speakers}")
        if self.min_speakers > self.max_speakers:
            raise ValueError(f"min_speakers: {self.min_speakers} is more than max_speakers ({self.max_speakers})")
        if not 0 < self.hop_s <= self.window_s <= 10:
            raise ValueError(f"window_s: need 0 < hop_s <= window_s <= 10, got {self.hop_s} and {self.window_s}")
        return self


def diarization_vad(base: VadOptions) -> VadOptions:
    """The VAD options diarization runs with: the model's, with at least 100 ms of padding per segment.

    Turn boundaries are scored against where people start and stop talking, soft onsets and
    endings included; the wider padding lowered missed speech from 6.8% to 5.5% of the
    calibration conversations' speech for 0.4% more false alarm.
    """
    return replace(base, speech_pad_ms=max(base.speech_pad_ms, 100.0))


@dataclass
class Turn:
    """One stretch of one speaker's speech."""

    start: float  # seconds
    end: float
    speaker: int  # cluster index
    confidence: float = 1.0
    windows: list[int] = field(default_factory=list)


def speech_windows(regions: list[tuple[int, int]], rate: int, opts: DiarizationOptions, offset: int = 0,
                   min_samples: int = 1) -> list[tuple[int, int]]:
    """Windows (start, end) in samples over the speech ``regions``, each shifted by ``offset`` samples; regions
    shorter than ``min_samples`` (too short for the model) give none."""
    win, hop = int(opts.window_s * rate), int(opts.hop_s * rate)
    out = []
    for a, b in ((a + offset, b + offset) for a, b in regions):
        if b - a < min_samples:
            continue
        if b - a <= win:
            out.append((a, b))
            continue
        starts = list(range(a, b - win + 1, hop))
        if starts[-1] + win < b:
            starts.append(b - win)  # the region's end is covered too
        out += [(s, s + win) for s in starts]
    return out


def _voiceprints(emb: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, D) unit mean of each label's window embeddings."""
    out = np.zeros((k, emb.shape[1]), np.float64)
    np.add.at(out, labels, emb.astype(np.float64))
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _centered(emb: np.ndarray) -> np.ndarray:
    """(N, D) unit embeddings less their recording mean: what the speakers of one recording do not share."""
    x = emb.astype(np.float64) - emb.astype(np.float64).mean(axis=0)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _fold_small(cen: np.ndarray, labels: np.ndarray, seconds: np.ndarray, min_s: float, keep: int) -> np.ndarray:
    """Give the windows of clusters with under ``min_s`` of speech to the closest larger cluster (keeps >= ``keep``)."""
    k = int(labels.max()) + 1
    dur = np.bincount(labels, weights=seconds, minlength=k)  # (k,)
    order = np.argsort(-dur)
    big = order[:max(keep, int((dur >= min_s).sum()), 1)]
    small = ~np.isin(labels, big)
    if small.any():
        prints = _voiceprints(cen, labels, k)  # (k, D)
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
    prints = _voiceprints(emb, labels, k)  # (k, D)
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

    cen = _centered(emb)  # (N, D)
    items = cen[::-(-n // MAX_TREE_ITEMS)]  # (M, D): every r-th window when there are too many for the tree
    tree = linkage(items, method="average", metric="cosine")

    def spread(sub: np.ndarray) -> np.ndarray:
        """(N,) labels of all windows from the (M,) labels of the tree's: each to its closest cluster."""
        if len(items) == n:
            return sub
        prints = _voiceprints(items, sub, int(sub.max()) + 1)  # (k, D)
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


def resegment(windows: list[tuple[int, int]], labels: np.ndarray, emb: np.ndarray, rate: int,
              opts: DiarizationOptions) -> list[Turn]:
    """Turns from labelled windows (see the module docstring); times in seconds."""
    if not windows:
        return []
    k = int(labels.max()) + 1
    prints = _voiceprints(emb, labels, k)
    sims = emb @ prints.T  # (N, k)
    labels = sims.argmax(axis=1)  # re-assigned to the closest voiceprint
    if opts.smooth > 1 and len(labels) >= opts.smooth:
        half = opts.smooth // 2
        padded = np.concatenate([labels[:1].repeat(half), labels, labels[-1:].repeat(half)])
        labels = np.array([np.bincount(padded[i:i + opts.smooth], minlength=k).argmax() for i in range(len(labels))])
    frame = max(1, int(FRAME_S * rate))
    end = max(b for _, b in windows)
    n_frames = -(-end // frame)
    votes = np.zeros((n_frames, k), np.float32)
    for w, (a, b) in enumerate(windows):
        fa, fb = a // frame, -(-b // frame)
        votes[fa:fb, labels[w]] += 1.0 + 1e-3 * sims[w, labels[w]]  # ties: the closer voiceprint
    speech = votes.sum(axis=1) > 0
    frame_label = votes.argmax(axis=1)
    margin = np.sort(sims, axis=1)
    confidence = 1.0 / (1.0 + np.exp(-20 * (margin[:, -1] - (margin[:, -2] if k > 1 else 0.0))))  # (N,)
    turns: list[Turn] = []
    i = 0
    while i < n_frames:
        if not speech[i]:
            i += 1
            continue
        j = i
        while j < n_frames and speech[j] and frame_label[j] == frame_label[i]:
            j += 1
        turns.append(Turn(i * frame / rate, j * frame / rate, int(frame_label[i])))
        i = j
    turns = _tidy(turns, opts)
    starts = np.array([a for a, _ in windows]) / rate  # (N,)
    ends = np.array([b for _, b in windows]) / rate
    for t in turns:  # confidence: the mean margin of the turn's own windows
        inside = np.flatnonzero((starts < t.end) & (ends > t.start) & (labels == t.speaker))
        t.windows = inside.tolist()
        t.confidence = float(confidence[inside].mean()) if len(inside) else 0.5
    return turns


def diarize_embedded(windows: list[tuple[int, int]], emb: np.ndarray, rate: int,
                     opts: DiarizationOptions) -> tuple[list[Turn], int]:
    """Cluster and resegment embedded windows: (turns, number of speakers).

    Args:
        windows: (start, end) samples of each window (``speech_windows``).
        emb: (N, D) unit embeddings of the windows.
        rate: samples per second of ``windows``.
        opts: as for ``cluster``.
    """
    if not windows:
        return [], 0
    seconds = np.array([(b - a) / rate for a, b in windows])  # (N,)
    labels, k = cluster(emb, seconds, opts)
    turns = resegment(windows, labels, _centered(emb) if k > 1 else emb, rate, opts)
    used = sorted({t.speaker for t in turns})  # a cluster can lose every frame to its neighbours
    remap = {old: new for new, old in enumerate(used)}
    for t in turns:
        t.speaker = remap[t.speaker]
    return turns, len(used)


def speakers_of(turns: list[Turn], emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each speaker's ((k,) seconds of speech, (k, D) unit voiceprint of the windows in their turns)."""
    seconds = np.zeros(k)
    prints = np.zeros((k, emb.shape[1]), np.float64)
    for t in turns:
        seconds[t.speaker] += t.end - t.start
        if t.windows:
            prints[t.speaker] += emb[t.windows].sum(axis=0)
    norms = np.maximum(np.linalg.norm(prints, axis=1, keepdims=True), 1e-12)
    return seconds, (prints / norms).astype(np.float32)


def _tidy(turns: list[Turn], opts: DiarizationOptions) -> list[Turn]:
    """Give short turns to their neighbours, then join a speaker's turns across short gaps."""
    changed = True
    while changed and len(turns) > 1:
        changed = False
        for i, t in enumerate(turns):
            if t.end - t.start >= opts.min_segment_s:
                continue
            prev = turns[i - 1] if i > 0 and abs(turns[i - 1].end - t.start) < 1e-6 else None
            nxt = turns[i + 1] if i + 1 < len(turns) and abs(turns[i + 1].start - t.end) < 1e-6 else None
            host = max((h for h in (prev, nxt) if h is not None), key=lambda h: h.end - h.start, default=None)
            if host is None:
                continue
            host.start, host.end = min(host.start, t.start), max(host.end, t.end)
            turns.pop(i)
            changed = True
            break
    out: list[Turn] = []
    for t in turns:
        if out and out[-1].speaker == t.speaker and t.start - out[-1].end < opts.merge_gap_s:
            out[-1].end = t.end
        else:
            out.append(t)
    return out


def to_rttm(turns: list[Turn], names: list[str], file_id: str) -> str:
    """RTTM lines: ``SPEAKER <file> 1 <start> <duration> <NA> <NA> <label> <NA> <NA>``."""
    return "".join(f"SPEAKER {file_id} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {names[t.speaker]} <NA> <NA>\n"
                   for t in turns)
