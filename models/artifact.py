"""The exported-model artifact: ``model.onnx`` plus a self-describing ``model.json``.

A model repository is a directory with one subdirectory per model::

    repository/
      ge2e/
        model.json        # this module's ModelCard
        model.onnx        # fp32 graph: waveform (B, T) [+ lengths (B,)] -> embedding (B, D)
        model.int8.onnx   # optional dynamic-int8 variant

The exporter (``models.export``) writes the card; the server reads it, checks the ONNX
session against it and reports it. Only the standard library is imported here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelCard", "ArtifactError", "load_card", "save_card", "scan_repository", "FORMAT_VERSION", "SCORE_SCALES",
           "TILT_BANDS"]

FORMAT_VERSION = 3
TILT_BANDS = 24  # bands of an ``input_tilt`` reference (models.spectral_tilt.BAND_EDGES_HZ)
# version 1 cards have no cohort, calibration, operating point or VAD section; version 2 cards have a
# plain linear map and one cohort group; version 3 adds channel groups, quality terms and a FAR table
_READABLE_VERSIONS = (1, 2, 3)
_BATCHING = ("padded", "same_length")
SCORE_SCALES = ("cosine", "normalized", "llr")
_VAD_KEYS = ("threshold", "neg_threshold", "min_speech_ms", "min_silence_ms", "speech_pad_ms", "normalize_level",
             "narrowband", "narrowband_threshold")


class ArtifactError(ValueError):
    """A model repository entry that is missing, malformed or inconsistent."""


@dataclass
class ModelCard:
    """Everything the server needs to know about an exported model.

    Attributes:
        name: repository entry name (the directory name), used by requests.
        version: the model's version string.
        sample_rate: Hz of the waveform input.
        embedding_dim: size of the embedding output.
        waveform_input: name of the (B, T) float32 input.
        lengths_input: name of the (B,) int64 input of valid sample counts, or None when the
            graph takes no lengths (then only equal-length inputs may share a batch).
        output: name of the (B, D) embedding output.
        batching: "padded" when zero-padding a waveform to a longer batch leaves its
            embedding unchanged (the graph masks by ``lengths``), else "same_length".
        threshold: cosine decision threshold calibrated on evaluation trials.
        min_audio_seconds: shortest input the model gives a meaningful embedding for.
        opset: ONNX opset of the graph.
        files: variant name -> file name ("fp32" is required).
        family, description, license, source, parameters: provenance for users.
        commercial_use: whether the weights' licence permits commercial use (None: not
            declared). A server loading "every model" skips those marked false.
        training_config, pruning, evaluation: free-form records of how it was made.
        cohort: the impostor cohort for score normalisation, or None: ``{"file": "cohort.npy",
            "size": M, "source": ..., ...}``; the file holds an (M, embedding_dim) float32
            array of unit voiceprints of training speakers.
        calibration: the map from S-norm scores to log-likelihood ratios, or None:
            ``{"score": "snorm", "scale": a, "offset": b, ...}`` (``llr = a * snorm + b``, a > 0)
            plus how it was fitted and its Cllr; needs a cohort.
        operating_point: the default decision, or None (cosine ``threshold``):
            ``{"scale": "cosine"|"normalized"|"llr", "threshold": t, ...}``; accept when the
            score on that scale is >= t.
        vad: voice activity detection options for this model (``threshold``, ``neg_threshold``,
            ``min_speech_ms``, ``min_silence_ms``, ``speech_pad_ms``), overriding the server's.
        input_level_dbfs: when set, every input is scaled to this RMS level (dB full scale)
            before the graph sees it, so that the embedding does not depend on recording gain
            (for models whose features are not level-invariant, e.g. linear-power mel); None
            leaves inputs as they are.
        input_tilt: when set, ``{"reference_db": [24 band levels], "min_db_per_octave": a,
            "max_db_per_octave": b}``: an input whose long-term spectrum slopes against the
            reference by less than a or more than b dB per octave is filtered back to that range
            before the graph (``models.spectral_tilt``); None leaves the spectrum as it is.
        remove_mains_hum: when true, 50/60 Hz mains hum found in an input (``models.mains_hum``)
            is taken out before the tilt and level steps; false leaves it in.
        band_map: when set, ``{"file": "band_map.npz", "ridge": r, "fitted_on": {...}}``: the
            linear maps that carry a wideband voiceprint into a narrowband channel's band, with
            an LLR offset per band (``models.band_map``); needs a calibration. None: a voiceprint
            is scored against a narrowband probe as it is.
    """

    name: str
    version: str
    sample_rate: int
    embedding_dim: int
    waveform_input: str = "waveform"
    lengths_input: str | None = "lengths"
    output: str = "embedding"
    batching: str = "padded"
    threshold: float = 0.5
    min_audio_seconds: float = 0.1
    opset: int = 17
    files: dict[str, str] = field(default_factory=lambda: {"fp32": "model.onnx"})
    family: str = ""
    description: str = ""
    license: str = ""
    commercial_use: bool | None = None
    source: str = ""
    parameters: int = 0
    training_config: dict[str, Any] = field(default_factory=dict)
    pruning: dict[str, Any] | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    cohort: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    operating_point: dict[str, Any] | None = None
    vad: dict[str, Any] | None = None
    input_level_dbfs: float | None = None
    input_tilt: dict[str, Any] | None = None
    remove_mains_hum: bool = False
    band_map: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def validate(self, where: str = "model.json") -> "ModelCard":
        """Check field types and ranges; raise ArtifactError naming the bad field."""

        def bad(name: str, why: str) -> ArtifactError:
            return ArtifactError(f"{where}: field '{name}' {why}")

        if not self.name or "/" in self.name:
            raise bad("name", f"must be a non-empty directory name, got {self.name!r}")
        if not isinstance(self.sample_rate, int) or not 1000 <= self.sample_rate <= 192000:
            raise bad("sample_rate", f"must be an integer in 1000..192000, got {self.sample_rate!r}")
        if not isinstance(self.embedding_dim, int) or self.embedding_dim <= 0:
            raise bad("embedding_dim", f"must be a positive integer, got {self.embedding_dim!r}")
        if self.batching not in _BATCHING:
            raise bad("batching", f"must be one of {_BATCHING}, got {self.batching!r}")
        if self.batching == "padded" and not self.lengths_input:
            raise bad("batching", "is 'padded' but the graph has no lengths_input")
        if not -1.0 <= float(self.threshold) <= 1.0:
            raise bad("threshold", f"must be a cosine score in [-1, 1], got {self.threshold!r}")
        if float(self.min_audio_seconds) < 0:
            raise bad("min_audio_seconds", f"must be >= 0, got {self.min_audio_seconds!r}")
        level = self.input_level_dbfs
        if level is not None and (isinstance(level, bool) or not isinstance(level, (int, float))
                                  or not math.isfinite(level) or not -60.0 <= level <= 0.0):
            raise bad("input_level_dbfs", f"must be a number of dB full scale in [-60, 0] or null, got {level!r}")
        if self.input_tilt is not None:
            _validate_tilt(self.input_tilt, bad)
        if not isinstance(self.remove_mains_hum, bool):
            raise bad("remove_mains_hum", f"must be true or false, got {self.remove_mains_hum!r}")
        if self.commercial_use is not None and not isinstance(self.commercial_use, bool):
            raise bad("commercial_use", f"must be true, false or absent, got {self.commercial_use!r}")
        if "fp32" not in self.files:
            raise bad("files", f"must name an 'fp32' file, got {self.files!r}")
        if self.format_version not in _READABLE_VERSIONS:
            raise bad("format_version", f"must be one of {_READABLE_VERSIONS}, got {self.format_version!r}")
        self._validate_scoring(bad)
        if self.vad is not None:
            if not isinstance(self.vad, dict) or set(self.vad) - set(_VAD_KEYS):
                raise bad("vad", f"must be an object with keys among {_VAD_KEYS}, got {self.vad!r}")
            for key, value in self.vad.items():
                if key in ("normalize_level", "narrowband"):
                    if not isinstance(value, bool):
                        raise bad(f"vad.{key}", f"must be true or false, got {value!r}")
                elif value is not None and not _finite(value):
                    raise bad(f"vad.{key}", f"must be a finite number, got {value!r}")
        return self

    def _validate_scoring(self, bad) -> None:
        """Cohort, calibration and operating point: types, finiteness and dependencies."""
        if self.cohort is not None:
            if not isinstance(self.cohort, dict) or not isinstance(self.cohort.get("file"), str):
                raise bad("cohort", f"must be an object with a 'file' name, got {self.cohort!r}")
            size = self.cohort.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 2:
                raise bad("cohort.size", f"must be an integer >= 2, got {size!r}")
            if self.cohort.get("groups_file") is not None:
                groups = self.cohort.get("groups")
                if not isinstance(self.cohort["groups_file"], str):
                    raise bad("cohort.groups_file", f"must be a file name, got {self.cohort['groups_file']!r}")
                if not (isinstance(groups, list) and groups and all(isinstance(g, str) for g in groups)):
                    raise bad("cohort.groups", f"must list the channel groups' names, got {groups!r}")
                narrow = self.cohort.get("narrowband_groups", [])
                if not (isinstance(narrow, list) and set(narrow) <= set(groups)):
                    raise bad("cohort.narrowband_groups", f"must be a list of names from cohort.groups, got {narrow!r}")
                band = self.cohort.get("bandlimited_groups", [])
                if not (isinstance(band, list) and set(band) <= set(narrow)):
                    raise bad("cohort.bandlimited_groups", f"must be a list of names from cohort.narrowband_groups, got {band!r}")
        if self.calibration is not None:
            if self.cohort is None:
                raise bad("calibration", "needs a cohort (it maps S-norm scores, which need one)")
            cal = self.calibration
            if not isinstance(cal, dict) or cal.get("score") != "snorm":
                raise bad("calibration.score", f"must be 'snorm', got {cal.get('score') if isinstance(cal, dict) else cal!r}")
            for key in ("scale", "offset"):
                if not _finite(cal.get(key)):
                    raise bad(f"calibration.{key}", f"must be a finite number, got {cal.get(key)!r}")
            for key in ("mismatch_scale", "mismatch_offset", "band_scale", "band_offset", "speech", "speech_reference"):
                if key in cal and not _finite(cal[key]):
                    raise bad(f"calibration.{key}", f"must be a finite number, got {cal[key]!r}")
            if cal["scale"] <= 0:
                raise bad("calibration.scale", f"must be > 0, got {cal['scale']!r}")
            if cal["scale"] + cal.get("mismatch_scale", 0.0) <= 0:
                raise bad("calibration.mismatch_scale", f"makes the slope <= 0 for mismatched pairs, got {cal['mismatch_scale']!r}")
            if cal["scale"] + cal.get("mismatch_scale", 0.0) + cal.get("band_scale", 0.0) <= 0:
                raise bad("calibration.band_scale", f"makes the slope <= 0 for band-limited pairs, got {cal['band_scale']!r}")
        if self.operating_point is not None:
            op = self.operating_point
            scale = op.get("scale") if isinstance(op, dict) else None
            if scale not in SCORE_SCALES:
                raise bad("operating_point.scale", f"must be one of {SCORE_SCALES}, got {scale!r}")
            if not _finite(op.get("threshold")):
                raise bad("operating_point.threshold", f"must be a finite number, got {op.get('threshold')!r}")
            if scale == "llr" and self.calibration is None:
                raise bad("operating_point.scale", "is 'llr' but the card has no calibration")
            if scale == "normalized" and self.cohort is None:
                raise bad("operating_point.scale", "is 'normalized' but the card has no cohort")
            table = op.get("far_table")
            if table is not None:
                ok = isinstance(table, list) and all(
                    isinstance(r, list) and len(r) == 2 and _finite(r[0]) and _finite(r[1]) and 0 < r[0] < 1 for r in table)
                rates = [r[0] for r in table] if ok else []
                if not ok or rates != sorted(rates):
                    raise bad("operating_point.far_table", "must be [[false-accept rate in (0, 1), LLR threshold], ...] "
                                                           "by increasing rate")
        if self.band_map is not None:
            if not isinstance(self.band_map, dict) or not isinstance(self.band_map.get("file"), str):
                raise bad("band_map", f"must be an object with a 'file' name, got {self.band_map!r}")
            if self.calibration is None:
                raise bad("band_map", "needs a calibration (its offsets are on the LLR scale)")

    def to_json(self) -> str:
        """The card as pretty-printed JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_tilt(spec: Any, bad) -> None:
    """Check a card's ``input_tilt`` object (see ``ModelCard``)."""
    keys = {"reference_db", "min_db_per_octave", "max_db_per_octave"}
    if not isinstance(spec, dict) or not keys <= set(spec):
        raise bad("input_tilt", f"must be an object with keys {sorted(keys)} or null, got {spec!r}")
    ref = spec["reference_db"]
    if not isinstance(ref, list) or len(ref) != TILT_BANDS or not all(_finite(v) for v in ref):
        raise bad("input_tilt.reference_db", f"must be a list of {TILT_BANDS} finite numbers (dB), got {ref!r}")
    lo, hi = spec["min_db_per_octave"], spec["max_db_per_octave"]
    for name, value in (("min_db_per_octave", lo), ("max_db_per_octave", hi)):
        if not _finite(value) or not -24.0 <= value <= 24.0:
            raise bad(f"input_tilt.{name}", f"must be a number of dB per octave in [-24, 24], got {value!r}")
    if lo > hi:
        raise bad("input_tilt", f"min_db_per_octave {lo} is above max_db_per_octave {hi}")


def load_card(model_dir: str | os.PathLike) -> ModelCard:
    """Read and validate ``model_dir/model.json``.

    Raises:
        ArtifactError: the directory or file is missing, the JSON is malformed, a field is
            unknown, missing or out of range, or a named ONNX file does not exist.
    """
    model_dir = Path(model_dir)
    path = model_dir / "model.json"
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: model directory does not exist")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (every model directory needs a model.json)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: must hold a JSON object")
    known = set(ModelCard.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ArtifactError(f"{path}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    try:
        card = ModelCard(**raw)
    except TypeError as e:
        raise ArtifactError(f"{path}: {e}") from None
    card.validate(str(path))
    if card.name != model_dir.name:
        raise ArtifactError(
            f"{path}: field 'name' is {card.name!r} but the directory is {model_dir.name!r}"
        )
    for variant, fname in card.files.items():
        if not (model_dir / fname).is_file():
            raise ArtifactError(f"{path}: files.{variant} names {fname!r}, which does not exist")
    if card.cohort is not None and not (model_dir / card.cohort["file"]).is_file():
        raise ArtifactError(f"{path}: cohort.file names {card.cohort['file']!r}, which does not exist")
    groups_file = (card.cohort or {}).get("groups_file")
    if groups_file and not (model_dir / groups_file).is_file():
        raise ArtifactError(f"{path}: cohort.groups_file names {groups_file!r}, which does not exist")
    band_file = (card.band_map or {}).get("file")
    if band_file and not (model_dir / band_file).is_file():
        raise ArtifactError(f"{path}: band_map.file names {band_file!r}, which does not exist")
    return card


def save_card(card: ModelCard, model_dir: str | os.PathLike) -> Path:
    """Validate and write ``model_dir/model.json`` atomically; returns its path."""
    card.validate()
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "model.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(card.to_json())
    os.replace(tmp, path)
    return path


def scan_repository(repo_dir: str | os.PathLike) -> list[Path]:
    """The model directories (those holding a model.json) of a repository, sorted by name.

    Hidden directories (``.pull/``: models being pulled) are never models.
    """
    repo_dir = Path(repo_dir)
    if not repo_dir.is_dir():
        raise ArtifactError(f"{repo_dir}: model repository directory does not exist")
    return sorted(p for p in repo_dir.iterdir() if not p.name.startswith(".") and (p / "model.json").is_file())
