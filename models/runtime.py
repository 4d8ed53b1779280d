"""ONNX Runtime speaker models: load an artifact, check it against its card, run batches.

Shared by the server (which runs ``embed`` on its batcher's worker threads) and the offline
evaluation jobs; it knows nothing of gRPC or asyncio and imports no torch.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from models.artifact import ArtifactError, ModelCard, load_card
from models.input_steps import InputSteps
from models.scoring import ModelScorer

__all__ = ["SpeakerModel", "available_providers"]

log = logging.getLogger("models.runtime")


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


class SpeakerModel:
    """One exported speaker model on an ONNX Runtime session.

    Args:
        model_dir: the repository entry (``model.json`` + ONNX files).
        providers: execution providers in order of preference; those the onnxruntime build
            lacks are skipped (CPU is always appended as the last resort).
        variant: which file of ``card.files`` to load ("fp32" or "int8").
        intra_op_threads: ONNX Runtime intra-op threads (0: its default).
        inter_op_threads: ONNX Runtime inter-op threads.
        spinning: let idle ONNX Runtime threads spin (lower latency on dedicated cores).
    """

    def __init__(
        self,
        model_dir: str | Path,
        providers: list[str] | None = None,
        variant: str = "fp32",
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        spinning: bool = False,
    ):
        import onnxruntime as ort

        self.dir = Path(model_dir)
        self.card: ModelCard = load_card(self.dir)
        if variant not in self.card.files:
            variant = "fp32"  # a model without an int8 file serves fp32
        self.variant = variant
        path = self.dir / self.card.files[variant]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads spin by default, burning cores that request handling needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        available = set(ort.get_available_providers())
        wanted = [p for p in (providers or ["CPUExecutionProvider"]) if p in available]
        if "CPUExecutionProvider" not in wanted:
            wanted.append("CPUExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ArtifactError(f"{path}: ONNX Runtime could not load the model ({e})") from None
        self.provider = self.session.get_providers()[0]
        self._check_session(path)
        try:
            self.scorer = ModelScorer.from_card(self.card, self.dir)
            self.input_steps = InputSteps(self.card)
        except ValueError as e:
            raise ArtifactError(f"{self.dir / 'model.json'}: {e}") from None
        log.info("loaded model %s (%s, %s) on %s", self.name, self.card.version, path.name, self.provider)

    # -- properties -------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Repository entry name."""
        return self.card.name

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self.card.embedding_dim

    @property
    def sample_rate(self) -> int:
        """Input sample rate in Hz."""
        return self.card.sample_rate

    @property
    def padded_batching(self) -> bool:
        """True when utterances of different lengths may share a zero-padded batch."""
        return self.card.batching == "padded"

    # -- checks -----------------------------------------------------------------------
    def _check_session(self, path: Path) -> None:
        """Make sure the graph's inputs and outputs are the ones the card promises."""
        card = self.card
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        expected_inputs = {card.waveform_input} | ({card.lengths_input} if card.lengths_input else set())
        if set(inputs) != expected_inputs:
            raise ArtifactError(
                f"{path}: graph inputs {sorted(inputs)} do not match model.json "
                f"(waveform_input/lengths_input = {sorted(expected_inputs)})"
            )
        wav = inputs[card.waveform_input]
        if wav.type != "tensor(float)" or len(wav.shape) != 2:
            raise ArtifactError(f"{path}: input {wav.name!r} must be a float (batch, samples) tensor, is {wav.type} {wav.shape}")
        if card.lengths_input:
            lens = inputs[card.lengths_input]
            if lens.type != "tensor(int64)" or len(lens.shape) != 1:
                raise ArtifactError(f"{path}: input {lens.name!r} must be an int64 (batch,) tensor, is {lens.type} {lens.shape}")
        if card.output not in outputs:
            raise ArtifactError(f"{path}: graph has no output {card.output!r} (has {sorted(outputs)})")
        out = outputs[card.output]
        if len(out.shape) != 2 or (isinstance(out.shape[1], int) and out.shape[1] != card.embedding_dim):
            raise ArtifactError(
                f"{path}: output {out.name!r} has shape {out.shape}, model.json says (batch, {card.embedding_dim})"
            )

    def warmup(self, seconds: float = 2.0, batch: int = 2) -> float:
        """Run one batch of noise, check the result's shape and finiteness; returns its seconds."""
        rng = np.random.default_rng(0)
        n = int(seconds * self.sample_rate)
        waves = [0.1 * rng.standard_normal(n).astype(np.float32) for _ in range(batch)]
        t0 = time.perf_counter()
        emb = self.embed(waves)
        took = time.perf_counter() - t0
        if emb.shape != (batch, self.dim) or not np.isfinite(emb).all():
            raise ArtifactError(f"{self.dir}: warm-up produced {emb.shape} / non-finite values, expected ({batch}, {self.dim})")
        return took

    # -- inference --------------------------------------------------------------------
    def embed(self, waves: list[np.ndarray], steps_pool: Executor | None = None) -> np.ndarray:
        """Embed mono float32 waveforms at the model's rate as one batch.

        Each waveform first goes through the card's input steps (``models.input_steps``: DC offset
        removed; mains hum, spectral slope and level as the card's ``remove_mains_hum``,
        ``input_tilt`` and ``input_level_dbfs`` ask); ``steps_pool``, when given, runs them for the
        batch's waveforms side by side (their FFTs and filters release the GIL), else this thread does.

        Models with ``batching == "padded"`` get a zero-padded (B, T_max) batch with lengths;
        others must be given equal-length waveforms (the batcher guarantees it).

        Returns:
            (B, D) float32, L2-normalised rows.
        """
        waves = list(steps_pool.map(self.input_steps, waves)) if steps_pool else [self.input_steps(w) for w in waves]
        lengths = np.array([len(w) for w in waves], dtype=np.int64)  # (B,)
        if not self.padded_batching and (lengths != lengths[0]).any():
            raise ValueError(f"model {self.name} takes only equal-length batches, got lengths {lengths.tolist()}")
        batch = np.zeros((len(waves), int(lengths.max())), dtype=np.float32)  # (B, T)
        for i, w in enumerate(waves):
            batch[i, : len(w)] = w
        feeds = {self.card.waveform_input: batch}
        if self.card.lengths_input:
            feeds[self.card.lengths_input] = lengths
        emb = self.session.run([self.card.output], feeds)[0].astype(np.float32, copy=False)  # (B, D)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.maximum(norms, 1e-12)

    def embed_many(self, waves: list[np.ndarray], max_batch_seconds: float = 120.0) -> np.ndarray:
        """Embed any number of waveforms in length-sorted batches; returns (N, D) in input order."""
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
        out = np.zeros((len(waves), self.dim), dtype=np.float32)
        budget = int(max_batch_seconds * self.sample_rate)
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and len(waves[order[j]]) * (j - i + 1) <= budget and (
                    self.padded_batching or len(waves[order[j]]) == len(waves[order[i]])):
                j += 1
            out[order[i:j]] = self.embed([waves[k] for k in order[i:j]])
            i = j
        return out
