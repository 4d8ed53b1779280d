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
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelCard", "ArtifactError", "load_card", "save_card", "scan_repository", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_BATCHING = ("padded", "same_length")


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
        training_config, pruning, evaluation: free-form records of how it was made.
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
    source: str = ""
    parameters: int = 0
    training_config: dict[str, Any] = field(default_factory=dict)
    pruning: dict[str, Any] | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
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
        if "fp32" not in self.files:
            raise bad("files", f"must name an 'fp32' file, got {self.files!r}")
        if self.format_version != FORMAT_VERSION:
            raise bad("format_version", f"must be {FORMAT_VERSION}, got {self.format_version!r}")
        return self

    def to_json(self) -> str:
        """The card as pretty-printed JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


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
    """The model directories (those holding a model.json) of a repository, sorted by name."""
    repo_dir = Path(repo_dir)
    if not repo_dir.is_dir():
        raise ArtifactError(f"{repo_dir}: model repository directory does not exist")
    return sorted(p for p in repo_dir.iterdir() if (p / "model.json").is_file())
