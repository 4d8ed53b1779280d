"""Re-fit a model's score map on an operator's own labelled trials: in-domain calibration.

    .venv/bin/python -m training.evaluation.calibrate --model-dir models/repository/ge2e \\
        --wav-scp mine/wav.scp --trials mine/trials --out models/repository/ge2e-mine [--version 1.0-mine]

Input layout (Kaldi style, UTF-8 text):

* ``wav.scp``: one recording per line, ``<utterance-id> <path>`` (any format the service reads;
  relative paths are relative to the wav.scp file);
* ``trials``: one trial per line, ``<utterance-id> <utterance-id> target|nontarget``: both
  utterances from ``wav.scp``, ``target`` when they are the same person.

At least ``MIN_TRIALS`` target and ``MIN_TRIALS`` non-target trials with enough speech on both
sides are needed (a few hundred of each from a few dozen people give a useful map). Every
recording is embedded as the service embeds it (VAD, the model's options); the model's cohort is
kept; the map (``models.calibration``, with its quality terms) and the false-accept table are
fitted on these trials; the operating point keeps its rule (``--operating-point`` to change it).
The result is a new repository entry under ``--out`` (never over an existing one) with its own
version, which a running server loads with ``spkserve load-model``. Its embeddings are those of
the original model, so voiceprints enrolled with either can be compared once the collection is
bound to the new name (``MigrateCollection``, or enrol again).

Bad input is refused before anything is written, naming the file and line: a malformed line, an
utterance listed twice, a missing or undecodable file, a trial naming an unknown utterance, too
few trials, or trials of one class only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from models.artifact import load_card, save_card
from models.audio import AudioError, decode_encoded
from models.calibration import cllr, fit_calibration, min_cllr
from models.runtime import SpeakerModel
from models.vad import SileroVad

__all__ = ["MIN_TRIALS", "read_wav_scp", "read_labelled_trials", "recalibrate_on_trials"]

MIN_TRIALS = 20


def read_wav_scp(path: Path) -> dict[str, tuple[int, Path]]:
    """utterance -> (line number, path); ValueError/FileNotFoundError naming the line at fault."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    out: dict[str, tuple[int, Path]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected '<utterance-id> <path>', got {line[:64]!r}")
        utt, file = parts[0], Path(parts[1].strip())
        if utt in out:
            raise ValueError(f"{path}:{n}: utterance {utt[:64]!r} is listed twice (first on line {out[utt][0]})")
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise FileNotFoundError(f"{path}:{n}: {str(file)[:200]} does not exist")
        out[utt] = (n, file)
    if not out:
        raise ValueError(f"{path}: lists no recordings")
    return out


def read_labelled_trials(path: Path, known: dict) -> list[tuple[int, str, str, bool]]:
    """(line, utt_a, utt_b, same speaker) per trial; ValueError naming the line at fault."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or parts[2] not in ("target", "nontarget"):
            raise ValueError(f"{path}:{n}: expected '<utterance-id> <utterance-id> target|nontarget', got {line[:64]!r}")
        for utt in parts[:2]:
            if utt not in known:
                raise ValueError(f"{path}:{n}: utterance {utt[:64]!r} is not in the wav.scp")
        if parts[0] == parts[1]:
            raise ValueError(f"{path}:{n}: a trial needs two different utterances, got {parts[0][:64]!r} twice")
        out.append((n, parts[0], parts[1], parts[2] == "target"))
    return out


def _count_check(labels: np.ndarray, what: str, path: Path) -> None:
    n_t, n_n = int(labels.sum()), int((~labels).sum())
    if n_t < MIN_TRIALS or n_n < MIN_TRIALS:
        raise ValueError(f"{path}: {n_t} target and {n_n} non-target trials {what}; at least {MIN_TRIALS} of each "
                         f"are needed")


def recalibrate_on_trials(model_dir: Path, wav_scp: Path, trials: Path, out: Path | None, *, version: str | None = None,
                          operating_point: str | None = None, min_probe_speech: float = 1.0, write: bool = True,
                          log=print) -> dict:
    """Fit the model's map on the operator's trials and write it as a new repository entry.

    Raises:
        FileNotFoundError, ValueError: bad input, naming the file and line; nothing is written.
    """
    from training.evaluation.operating_point import far_table, parse_operating_point
    from training.evaluation.realembed import Split, render_and_embed

    model_dir, wav_scp, trials = Path(model_dir), Path(wav_scp), Path(trials)
    if write and out is None:
        raise ValueError("--out: needed to write the re-fitted model")
    if write and Path(out).exists() and any(Path(out).iterdir()):
        raise ValueError(f"--out: {out} exists and is not empty; choose a new directory")
    model = SpeakerModel(model_dir, ["CPUExecutionProvider"])
    if model.scorer.cohort is None:
        raise ValueError(f"{model_dir}: the model has no cohort to normalise with (calibrate it with --real first)")
    card = load_card(model_dir)
    op = operating_point or (f"llr:{card.operating_point['threshold']}" if card.operating_point and
                             card.operating_point.get("scale") == "llr" else "llr:2")
    kind, value = parse_operating_point(op)
    if kind != "llr":
        raise ValueError(f"--operating-point: re-fitting on trials supports llr:THRESHOLD, got {op!r}")
    scp = read_wav_scp(wav_scp)
    listed = read_labelled_trials(trials, scp)
    _count_check(np.array([lab for *_, lab in listed], bool), "listed", trials)
    used = sorted({u for _, a, b, _ in listed for u in (a, b)})
    audio = []
    for utt in used:
        line, file = scp[utt]
        try:
            samples, rate = decode_encoded(file.read_bytes(), utt)
        except AudioError as e:
            raise ValueError(f"{wav_scp}:{line}: cannot decode {str(file)[:200]} ({e.message})") from None
        audio.append((samples.mean(axis=1).astype(np.float32), rate))
    split = Split(used, used, audio)
    r = render_and_embed(model, SileroVad(), split, ["clean"], min_probe_speech)
    index = {u: i for i, u in enumerate(used)}
    ia = np.array([index[a] for _, a, _, _ in listed])
    ib = np.array([index[b] for _, _, b, _ in listed])
    label = np.array([lab for *_, lab in listed], bool)
    ok = r.ok[ia] & r.ok[ib]
    _count_check(label[ok], f"with at least {min_probe_speech:g} s of speech on both sides", trials)
    ia, ib, label = ia[ok], ib[ok], label[ok]
    stats = model.scorer.stats(r.emb)  # (N, 3)
    cos = np.einsum("nd,nd->n", r.emb[ia], r.emb[ib]).astype(np.float64)
    snorm = 0.5 * ((cos - stats[ia, 0]) / stats[ia, 1] + (cos - stats[ib, 0]) / stats[ib, 1])
    mismatch, band = model.scorer.pair_quality(stats[ia], stats[ib])
    speech = np.minimum(r.speech[ia], r.speech[ib])
    fit = fit_calibration(snorm, label, mismatch=mismatch, min_speech=speech, band=band)
    llr = fit.llr(snorm, mismatch, speech, band)
    far = float((llr[~label] >= value).mean())
    frr = float((llr[label] < value).mean())
    new_version = version or f"{card.version}+recal"
    report = {"model": card.name, "version": new_version, "trials": str(trials), "n_target": int(label.sum()),
              "n_nontarget": int((~label).sum()), "left_out_for_speech": int((~ok).sum()), "map": fit.to_card(),
              "cllr": round(cllr(llr, label), 4), "min_cllr": round(min_cllr(llr, label), 4),
              "operating_point": {"scale": "llr", "threshold": value, "far": round(far, 5), "frr": round(frr, 5),
                                  "far_table": far_table(llr, label), "measured_on": f"the operator's trials ({trials})",
                                  "rule": f"LLR >= {value:g} (re-fitted on the operator's trials)"}}
    log(f"re-fitted on {report['n_target']} target / {report['n_nontarget']} non-target trials: Cllr {report['cllr']} "
        f"(min {report['min_cllr']}); at LLR >= {value:g}: FAR {far:.4f} FRR {frr:.4f}")
    if write:
        out = Path(out)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp)
        new = load_card(model_dir)
        new.name, new.version = out.name, new_version
        new.calibration = {"score": "snorm", **fit.to_card(), "fitted_on": {k: report[k] for k in
                                                                             ("trials", "n_target", "n_nontarget")},
                           "refitted_from": f"{card.name} {card.version}"}
        new.operating_point = report["operating_point"]
        if new.band_map is not None:  # its LLR offsets belong to the old calibration
            (tmp / new.band_map["file"]).unlink(missing_ok=True)
            new.band_map = None
            log("the band map (fitted on the old calibration) is left out: fit it again with "
                "python -m training.evaluation.band_map on a real-speech pool")
        save_card(new, tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
        log(f"wrote {out} (version {new_version}); load it with `spkserve load-model {out.name}`")
    return report
