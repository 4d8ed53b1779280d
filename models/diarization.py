"""Speaker diarization from window embeddings: who spoke when.

The steps after VAD and embedding, free of any server or framework (``service.diarize`` runs
them on the service's VAD, models and batcher; ``training.evaluation.diarization_eval`` scores them):

1. **Windows** (``speech_windows``): every speech region is cut into windows of
   ``window_s`` every ``hop_s``; a region shorter than a window is one window.
2. **Clustering** (``cluster``, in ``models.diarization_cluster``): the window embeddings less
   their recording mean (what the speakers of one recording share: channel, room, codec) are clustered by average-linkage
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
3. **Sticky HMM** (``sticky_hmm``, in ``models.diarization_hmm``): the clustering's labels are
   refined by a hidden Markov model over the windows in time order (speakers as states, a change of
   speaker unlikely between overlapping windows and likelier across a pause, cosine emissions
   around each speaker's voiceprint), VBx's idea without its trained PLDA. With the number of
   speakers given, the HMM's labels are used only if every speaker keeps windows.
4. **Resegmentation** (``resegment``): every 10 ms frame of speech takes the
   label of the windows covering it (a tie goes to the closer voiceprint); speech that a second,
   generous VAD pass finds outside every window (soft onsets, quiet endings, short pauses:
   ``diarization_speech_vad``) takes the label of the closest labelled frame within ``fill_s``;
   runs of one label become segments, a speaker's segments closer than ``merge_gap_s`` are merged
   and segments shorter than ``min_segment_s`` are given to their neighbours.

Overlapped speech is not detected: where two people talk at once the frames go to one of them
(the other's longer turns around the overlap are kept). Only numpy and scipy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from models.diarization_cluster import (
    MAX_GRAPH_ITEMS,
    MAX_TREE_ITEMS,
    centered,
    cluster,
    estimate_speakers,
    graph_items,
    voiceprints,
)
from models.diarization_hmm import sticky_hmm
from models.vad import VadOptions

__all__ = ["FRAME_S", "MAX_GRAPH_ITEMS", "MAX_TREE_ITEMS", "DiarizationOptions", "Turn", "cluster",
           "diarization_speech_vad", "diarization_vad", "diarize_embedded", "estimate_speakers", "graph_items",
           "resegment", "speakers_of", "speech_windows", "to_rttm"]

FRAME_S = 0.01


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
        hmm_kappa, hmm_switch, hmm_pause_switch, hmm_iters: the sticky HMM that refines the clustering's
            labels (``models.diarization_hmm.sticky_hmm``): the concentration of a speaker's window
            embeddings around their voiceprint, the probability of a change of speaker between
            neighbouring windows inside a stretch of speech and across a pause, and the rounds of EM.
            ``hmm_kappa`` 0: no HMM; each window goes to its closest voiceprint, median-filtered over
            ``smooth`` windows (the rule before; ``smooth`` applies only then).
        fill_s: speech found by the generous VAD (``diarization_speech_vad``) outside every window
            takes the label of the closest labelled frame up to this far away (seconds); farther, it
            stays unlabelled.
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
    merge_gap_s: float = 0.1
    smooth: int = 3
    fill_s: float = 1.0
    hmm_kappa: float = 5.0
    hmm_switch: float = 0.05
    hmm_pause_switch: float = 0.5
    hmm_iters: int = 3

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
        if not 0 <= self.fill_s <= 10:
            raise ValueError(f"fill_s: must be in 0..10, got {self.fill_s}")
        if not 0 <= self.hmm_kappa <= 1000:
            raise ValueError(f"hmm_kappa: must be in 0..1000, got {self.hmm_kappa}")
        for name in ("hmm_switch", "hmm_pause_switch"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a probability in (0, 1), got {getattr(self, name)}")
        if not 1 <= self.hmm_iters <= 50:
            raise ValueError(f"hmm_iters: must be in 1..50, got {self.hmm_iters}")
        return self


def diarization_vad(base: VadOptions) -> VadOptions:
    """The VAD options diarization runs with: the model's, with at least 100 ms of padding per segment.

    Turn boundaries are scored against where people start and stop talking, soft onsets and
    endings included; the wider padding lowered missed speech from 6.8% to 5.5% of the
    calibration conversations' speech for 0.4% more false alarm.
    """
    return replace(base, speech_pad_ms=max(base.speech_pad_ms, 100.0))


def diarization_speech_vad(base: VadOptions) -> VadOptions:
    """The generous VAD options that say where the output's speech is (the turns' extent, not their labels).

    The windows that are embedded and clustered come from ``diarization_vad``: its segments are
    speech the model can label. Where people start and stop talking, soft onsets, quiet endings
    and short pauses inside a turn score as speech too; these options (threshold at most 0.35,
    padding at least 200 ms, pauses shorter than 300 ms kept inside a segment) find them, and
    ``resegment`` labels them from the closest windows. Both rule sets run on one pass of the
    network (``SileroVad.analyse_many``). On the calibration conversations missed speech went
    from 8.3% to 6.5% of the reference for 0.4% more false alarm (BENCHMARKS.md, section 11e);
    embedding windows from these generous segments instead moved the clustering's confusion by
    up to 4 points of DER on the evaluation speakers, which is why the two are kept apart.
    """
    return replace(base, threshold=min(base.threshold, 0.35),
                   narrowband_threshold=min(base.narrowband_threshold, 0.35),
                   speech_pad_ms=max(base.speech_pad_ms, 200.0), min_silence_ms=max(base.min_silence_ms, 300.0))


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


def resegment(windows: list[tuple[int, int]], labels: np.ndarray, emb: np.ndarray, rate: int,
              opts: DiarizationOptions, speech: list[tuple[int, int]] | None = None,
              reassign: bool = True, posterior: np.ndarray | None = None) -> list[Turn]:
    """Turns from labelled windows (see the module docstring); times in seconds.

    ``speech``: (start, end) samples of the generous VAD's segments (``diarization_speech_vad``);
    their frames outside every window take the label of the closest labelled frame within
    ``opts.fill_s``. None: the windows alone say where speech is. ``reassign``: each window first
    goes to its closest voiceprint and labels are median-filtered over ``opts.smooth`` windows
    (labels straight from clustering); False: the labels are final (the sticky HMM's). A turn's
    ``confidence`` is the mean over its windows of ``posterior`` ((N,) probability of each window's
    label, the HMM's) or, without it, of a sigmoid of the margin between the two closest voiceprints.
    """
    if not windows:
        return []
    k = int(labels.max()) + 1
    prints = voiceprints(emb, labels, k)
    sims = emb @ prints.T  # (N, k)
    if reassign:
        labels = sims.argmax(axis=1)  # re-assigned to the closest voiceprint
        if opts.smooth > 1 and len(labels) >= opts.smooth:
            half = opts.smooth // 2
            padded = np.concatenate([labels[:1].repeat(half), labels, labels[-1:].repeat(half)])
            labels = np.array([np.bincount(padded[i:i + opts.smooth], minlength=k).argmax()
                               for i in range(len(labels))])
    frame = max(1, int(FRAME_S * rate))
    end = max([b for _, b in windows] + [b for _, b in speech or []])
    n_frames = -(-end // frame)
    votes = np.zeros((n_frames, k), np.float32)
    for w, (a, b) in enumerate(windows):
        fa, fb = a // frame, -(-b // frame)
        votes[fa:fb, labels[w]] += 1.0 + 1e-3 * sims[w, labels[w]]  # ties: the closer voiceprint
    voiced = votes.sum(axis=1) > 0  # (n_frames,)
    frame_label = votes.argmax(axis=1)  # (n_frames,)
    if speech:
        frame_label, voiced = _fill(frame_label, voiced, speech, frame, int(round(opts.fill_s / FRAME_S)))
    if posterior is not None:
        confidence = posterior  # (N,)
    else:
        margin = np.sort(sims, axis=1)
        confidence = 1.0 / (1.0 + np.exp(-20 * (margin[:, -1] - (margin[:, -2] if k > 1 else 0.0))))  # (N,)
    turns: list[Turn] = []
    i = 0
    while i < n_frames:
        if not voiced[i]:
            i += 1
            continue
        j = i
        while j < n_frames and voiced[j] and frame_label[j] == frame_label[i]:
            j += 1
        turns.append(Turn(i * frame / rate, min(j * frame, end) / rate, int(frame_label[i])))  # not past the speech
        i = j
    turns = _tidy(turns, opts)
    starts = np.array([a for a, _ in windows]) / rate  # (N,)
    ends = np.array([b for _, b in windows]) / rate
    for t in turns:  # confidence: the mean margin of the turn's own windows
        inside = np.flatnonzero((starts < t.end) & (ends > t.start) & (labels == t.speaker))
        t.windows = inside.tolist()
        t.confidence = float(confidence[inside].mean()) if len(inside) else 0.5
    return turns


def _fill(frame_label: np.ndarray, voiced: np.ndarray, speech: list[tuple[int, int]], frame: int,
          reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Label the frames of ``speech`` (samples) that no window covers with the closest voiced frame's label,
    at most ``reach`` frames away: ((n_frames,) labels, (n_frames,) voiced)."""
    n = len(voiced)
    wanted = np.zeros(n, bool)
    for a, b in speech:
        wanted[a // frame:-(-b // frame)] = True
    todo = np.flatnonzero(wanted & ~voiced)
    have = np.flatnonzero(voiced)
    if not len(todo) or not len(have):
        return frame_label, voiced
    right = np.clip(np.searchsorted(have, todo), 0, len(have) - 1)
    left = np.clip(right - 1, 0, len(have) - 1)
    nearest = np.where(np.abs(have[left] - todo) <= np.abs(have[right] - todo), have[left], have[right])
    close = np.abs(nearest - todo) <= reach
    frame_label, voiced = frame_label.copy(), voiced.copy()
    frame_label[todo[close]] = frame_label[nearest[close]]
    voiced[todo[close]] = True
    return frame_label, voiced


def diarize_embedded(windows: list[tuple[int, int]], emb: np.ndarray, rate: int,
                     opts: DiarizationOptions, speech: list[tuple[int, int]] | None = None) -> tuple[list[Turn], int]:
    """Cluster and resegment embedded windows: (turns, number of speakers).

    Args:
        windows: (start, end) samples of each window (``speech_windows``).
        emb: (N, D) unit embeddings of the windows.
        rate: samples per second of ``windows``.
        opts: as for ``cluster``.
        speech: (start, end) samples of the generous VAD's segments (``diarization_speech_vad``), whose
            frames outside the windows are labelled from the closest windows; None: the windows' extent only.
    """
    if not windows:
        return [], 0
    seconds = np.array([(b - a) / rate for a, b in windows])  # (N,)
    labels, k = cluster(emb, seconds, opts)
    x = centered(emb) if k > 1 else emb  # (N, D)
    posterior = None  # (N,) probability of each window's label, when the HMM gave it
    if k > 1 and opts.hmm_kappa > 0:
        bounds = np.array(windows, np.int64)  # (N, 2)
        pause = np.concatenate([[False], bounds[1:, 0] > bounds[:-1, 1]])  # (N,)
        hmm, gamma = sticky_hmm(x, pause, labels, k, opts.hmm_kappa, opts.hmm_switch, opts.hmm_pause_switch,
                                opts.hmm_iters)
        if opts.num_speakers is None or len(np.unique(hmm)) == k:  # a given number is kept
            labels, posterior = hmm, gamma[np.arange(len(hmm)), hmm]
    turns = resegment(windows, labels, x, rate, opts, speech, reassign=opts.hmm_kappa == 0,
                      posterior=posterior)
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
