"""SSL speaker models: a ``transformers`` SSL encoder + layer weighting + pooling + projection.

Families: WavLM, HuBERT, wav2vec 2.0 (``transformers`` ``WavLMModel``, ``HubertModel``,
``Wav2Vec2Model``), built from a config (random init) or loaded from a local
``save_pretrained`` directory, and ``WavLMForXVector`` checkpoints (the format of the public
``wavlm-base-plus-sv`` model) as they are.

Batches are padding-invariant, which the service relies on (``batching: padded``):
- the waveform is zeroed beyond ``lengths``;
- the first convolution's GroupNorm (``feat_extract_norm="group"``, HuBERT / WavLM Base /
  wav2vec 2.0 Base) normalises each channel over the utterance's valid frames only: with
  plain GroupNorm the padded zeros would change every frame's statistics;
- the encoder gets the frame-level attention mask (``transformers`` zeroes padded frames
  before the positional convolution and masks attention);
- pooling is masked.

Pruned models have a different FFN width per layer: ``SSLSpeakerConfig.ffn_widths`` records
one width per layer and ``build_model`` rebuilds the sliced layers, so a model is saved as
``{state_dict, config}`` and rebuilt by one function.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.pooling import AttentiveStatsPool, MeanStdPool, masked_mean_std  # noqa: F401  (re-exported)

__all__ = [
    "FAMILIES",
    "SSLSpeakerConfig",
    "SSLSpeakerModel",
    "XVectorSpeakerModel",
    "build_model",
    "build_encoder",
    "load_encoder",
    "save_checkpoint",
    "load_checkpoint",
    "ffn_layers",
    "frame_lengths",
]


def _families() -> dict[str, tuple[type, type]]:
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model, WavLMConfig, WavLMModel

    return {
        "wavlm": (WavLMConfig, WavLMModel),
        "hubert": (HubertConfig, HubertModel),
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
    }


FAMILIES = ("wavlm", "hubert", "wav2vec2")


def _family_classes(family: str) -> tuple[type, type]:
    table = _families()
    if family not in table:
        raise ValueError(f"unknown SSL model family {family!r}; valid families are {sorted(table)}")
    return table[family]


@dataclass
class SSLSpeakerConfig:
    """Everything ``build_model`` needs to rebuild an SSL speaker model.

    Attributes:
        family: "wavlm", "hubert" or "wav2vec2".
        encoder: the ``transformers`` config of the encoder, as a dict.
        ffn_widths: FFN units per encoder layer (None: the config's intermediate_size everywhere).
        pooling: "asp" (attentive statistics) or "meanstd".
        embedding_dim: output size.
        asp_hidden: hidden size of the attentive pooling's attention MLP.
        sample_rate: input rate in Hz.
    """

    family: str
    encoder: dict[str, Any]
    ffn_widths: list[int] | None = None
    pooling: str = "asp"
    embedding_dim: int = 192
    asp_hidden: int = 128
    sample_rate: int = 16000
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "SSLSpeakerConfig":
        """Raise ValueError naming a bad field."""
        _family_classes(self.family)
        if self.pooling not in ("asp", "meanstd"):
            raise ValueError(f"config field 'pooling' must be 'asp' or 'meanstd', got {self.pooling!r}")
        layers = self.encoder.get("num_hidden_layers")
        if self.ffn_widths is not None and len(self.ffn_widths) != layers:
            raise ValueError(f"config field 'ffn_widths' has {len(self.ffn_widths)} entries, the encoder has {layers} layers")
        if self.embedding_dim <= 0:
            raise ValueError(f"config field 'embedding_dim' must be positive, got {self.embedding_dim}")
        return self


def build_encoder(family: str, encoder_config: dict[str, Any] | Any) -> nn.Module:
    """A randomly initialised ``transformers`` encoder of ``family`` from a config dict or object."""
    config_cls, model_cls = _family_classes(family)
    if isinstance(encoder_config, dict):
        encoder_config = config_cls(**{k: v for k, v in encoder_config.items() if k not in ("model_type", "transformers_version", "architectures")})
    encoder_config._attn_implementation = "eager"  # traceable for ONNX export, identical maths
    return model_cls(encoder_config)


def load_encoder(path: str | Path) -> tuple[str, nn.Module]:
    """Load a local ``save_pretrained`` SSL checkpoint directory; returns (family, model).

    Raises:
        FileNotFoundError: the directory or its config.json is missing.
        ValueError: the config names a model type that is not a supported family.
    """
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (a save_pretrained directory has config.json)")
    model_type = json.loads(cfg_path.read_text()).get("model_type", "")
    family = {"wavlm": "wavlm", "hubert": "hubert", "wav2vec2": "wav2vec2"}.get(model_type)
    if family is None:
        raise ValueError(f"{cfg_path}: model_type {model_type!r} is not supported; valid: {list(FAMILIES)}")
    _, model_cls = _family_classes(family)
    model = model_cls.from_pretrained(str(path), attn_implementation="eager")
    return family, model.eval()


def ffn_layers(encoder: nn.Module) -> list[nn.Module]:
    """The ``feed_forward`` modules of every encoder layer (fc1 = intermediate_dense, fc2 = output_dense)."""
    return [layer.feed_forward for layer in encoder.encoder.layers]


def _set_ffn_widths(encoder: nn.Module, widths: list[int]) -> None:
    """Replace each layer's FFN Linear pair by one of the given width (weights re-initialised)."""
    for ff, width in zip(ffn_layers(encoder), widths):
        fc1, fc2 = ff.intermediate_dense, ff.output_dense
        if fc1.out_features != width:
            ff.intermediate_dense = nn.Linear(fc1.in_features, width)
            ff.output_dense = nn.Linear(width, fc2.out_features)


def frame_lengths(encoder: nn.Module, lengths: torch.Tensor) -> torch.Tensor:
    """Valid encoder frames for ``lengths`` valid samples, (B,) int64."""
    cfg = encoder.config
    out = lengths
    for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
        out = torch.div(out - k, s, rounding_mode="floor") + 1
    return out


class _MaskedFeatureEncoder(nn.Module):
    """Replaces the conv feature encoder's forward so its GroupNorm sees only valid frames.

    ``lengths`` (B,) is set by the owning model right before the encoder runs.
    """

    def __init__(self, inner: nn.Module, config: Any):
        super().__init__()
        self.conv_layers = inner.conv_layers
        self.kernel0, self.stride0 = config.conv_kernel[0], config.conv_stride[0]
        self.group_norm = config.feat_extract_norm == "group"
        self.lengths: torch.Tensor | None = None
        self._requires_grad = True

    def _freeze_parameters(self) -> None:
        for p in self.parameters():
            p.requires_grad = False
        self._requires_grad = False

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, C, T') conv features."""
        x = input_values[:, None]  # (B, 1, T)
        first = self.conv_layers[0]
        if self.group_norm and self.lengths is not None:
            h = first.conv(x)  # (B, C, T0)
            gn = first.layer_norm
            n0 = torch.div(self.lengths - self.kernel0, self.stride0, rounding_mode="floor") + 1  # (B,)
            n0 = torch.clamp(n0, min=1)
            mask = (torch.arange(h.shape[2], device=h.device).unsqueeze(0) < n0.unsqueeze(1)).to(h.dtype)  # (B, T0)
            mask = mask.unsqueeze(1)  # (B, 1, T0)
            count = n0.to(h.dtype).view(-1, 1, 1)
            mean = (h * mask).sum(dim=2, keepdim=True) / count  # (B, C, 1)
            var = (((h - mean) * mask) ** 2).sum(dim=2, keepdim=True) / count  # (B, C, 1)
            h = (h - mean) / torch.sqrt(var + gn.eps) * gn.weight.view(1, -1, 1) + gn.bias.view(1, -1, 1)
            h = first.activation(h)
        else:
            h = first(x)
        for layer in self.conv_layers[1:]:
            h = layer(h)
        return h


def _install_masked_frontend(encoder: nn.Module) -> _MaskedFeatureEncoder:
    fe = encoder.feature_extractor
    if isinstance(fe, _MaskedFeatureEncoder):
        return fe
    if encoder.config.feat_extract_norm == "group":
        gn = fe.conv_layers[0].layer_norm
        if gn.num_groups != gn.num_channels:
            raise ValueError(f"masked GroupNorm needs one group per channel, got {gn.num_groups} groups for {gn.num_channels} channels")
    masked = _MaskedFeatureEncoder(fe, encoder.config)
    encoder.feature_extractor = masked
    return masked


def _hidden_states(encoder: nn.Module, frontend: _MaskedFeatureEncoder, wave: torch.Tensor,
                   lengths: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Run the encoder padding-invariantly; returns (hidden states (L+1) x (B, T', H), frame mask (B, T'))."""
    valid = torch.arange(wave.shape[1], device=wave.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    wave = wave * valid.to(wave.dtype)
    frontend.lengths = lengths
    try:
        out = encoder(wave, attention_mask=valid.to(torch.long), output_hidden_states=True)
    finally:
        frontend.lengths = None
    n = frame_lengths(encoder, lengths)  # (B,)
    t = out.hidden_states[0].shape[1]
    frame_mask = torch.arange(t, device=wave.device).unsqueeze(0) < n.unsqueeze(1)  # (B, T')
    return out.hidden_states, frame_mask


class SSLSpeakerModel(nn.Module):
    """SSL encoder -> softmax-weighted sum of hidden layers -> pooling -> Linear embedding.

    forward(waveform (B, T) float32, lengths (B,) int64) -> (B, D) L2-normalised embeddings.
    """

    def __init__(self, config: SSLSpeakerConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.config = config.validate()
        self.encoder = encoder if encoder is not None else build_encoder(config.family, config.encoder)
        if config.ffn_widths is not None:
            _set_ffn_widths(self.encoder, config.ffn_widths)
        self.frontend = _install_masked_frontend(self.encoder)
        self.encoder.config.layerdrop = 0.0  # skipped layers would break the weighted layer sum
        hidden = self.encoder.config.hidden_size
        n_states = self.encoder.config.num_hidden_layers + 1
        self.layer_weights = nn.Parameter(torch.zeros(n_states))
        self.pool = AttentiveStatsPool(hidden, config.asp_hidden) if config.pooling == "asp" else MeanStdPool(hidden)
        self.head = nn.Sequential(nn.LayerNorm(self.pool.output_dim), nn.Linear(self.pool.output_dim, config.embedding_dim))

    @property
    def embedding_dim(self) -> int:
        """Size of the output embedding."""
        return self.config.embedding_dim

    def frames(self, waveform: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Hidden states of every layer, [(B, T', H)] * (L+1), and the frame mask (B, T')."""
        states, mask = _hidden_states(self.encoder, self.frontend, waveform, lengths)
        return list(states), mask

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) float32, (B,) int64 -> (B, D) unit embeddings."""
        states, mask = _hidden_states(self.encoder, self.frontend, waveform, lengths)
        w = torch.softmax(self.layer_weights, dim=0)  # (L+1,)
        x = (torch.stack(states, dim=0) * w.view(-1, 1, 1, 1)).sum(dim=0)  # (B, T', H)
        emb = self.head(self.pool(x, mask))  # (B, D)
        return emb / emb.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def to_checkpoint(self) -> dict[str, Any]:
        """``{state_dict, config}`` with the current per-layer FFN widths."""
        cfg = copy.deepcopy(self.config)
        cfg.ffn_widths = [ff.intermediate_dense.out_features for ff in ffn_layers(self.encoder)]
        cfg.encoder = self.encoder.config.to_dict()
        return {"state_dict": self.state_dict(), "config": asdict(cfg)}


class XVectorSpeakerModel(nn.Module):
    """A ``transformers`` ``WavLMForXVector`` as it is, made padding-invariant and export-friendly.

    Runs the checkpoint's own modules (weighted layer sum, projector, TDNN, statistics
    pooling, embedding layer) with masked statistics instead of the per-utterance Python loop.
    forward(waveform (B, T), lengths (B,)) -> (B, D) L2-normalised x-vectors.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model.eval()
        self.frontend = _install_masked_frontend(self.hf.wavlm)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "XVectorSpeakerModel":
        """Load a local ``WavLMForXVector`` ``save_pretrained`` directory."""
        from transformers import WavLMForXVector

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'}: missing (not a save_pretrained directory)")
        return cls(WavLMForXVector.from_pretrained(str(path), attn_implementation="eager"))

    @property
    def embedding_dim(self) -> int:
        """Size of the x-vector."""
        return self.hf.config.xvector_output_dim

    def raw_embedding(self, waveform: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The checkpoint's un-normalised ``embeddings`` output, (B, D)."""
        hf = self.hf
        states, mask = _hidden_states(hf.wavlm, self.frontend, waveform, lengths)
        if hf.config.use_weighted_layer_sum:
            w = torch.softmax(hf.layer_weights, dim=-1)
            x = (torch.stack(states, dim=1) * w.view(-1, 1, 1)).sum(dim=1)  # (B, T', H)
        else:
            x = states[-1]
        x = hf.projector(x)
        for tdnn in hf.tdnn:
            x = tdnn(x)  # (B, T'', C): valid frames read only valid inputs (no padding)
        n = frame_lengths(hf.wavlm, lengths)
        for k, d in zip(hf.config.tdnn_kernel, hf.config.tdnn_dilation):
            n = n - d * (k - 1)
        tmask = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < n.unsqueeze(1)  # (B, T'')
        mean, std = masked_mean_std(x, tmask, unbiased=True)
        return hf.feature_extractor(torch.cat([mean, std], dim=-1))

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T), (B,) -> (B, D) unit x-vectors."""
        emb = self.raw_embedding(waveform, lengths)
        return emb / emb.norm(dim=1, keepdim=True).clamp(min=1e-12)


def build_model(config: SSLSpeakerConfig | dict[str, Any]) -> SSLSpeakerModel:
    """Rebuild an SSL speaker model (per-layer FFN widths included) from its config."""
    if isinstance(config, dict):
        known = set(SSLSpeakerConfig.__dataclass_fields__)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown SSL speaker config field(s) {unknown}; known: {sorted(known)}")
        config = SSLSpeakerConfig(**config)
    return SSLSpeakerModel(config)


def save_checkpoint(model: SSLSpeakerModel, path: str | Path, **extra: Any) -> Path:
    """Save ``{state_dict, config, **extra}`` with torch.save; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**model.to_checkpoint(), **extra}, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[SSLSpeakerModel, dict[str, Any]]:
    """Rebuild a model saved by ``save_checkpoint``; returns (model in eval mode, the raw checkpoint).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint of this format, or its state dict does not
            match its config (the message lists missing/unexpected/mismatched keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for corrupt files
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: expected a dict with 'state_dict' and 'config'")
    model = build_model(ckpt["config"])
    own = model.state_dict()
    sd = ckpt["state_dict"]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or mismatched:
        detail = "; ".join(f"{name}: {keys[:5]}{' ...' if len(keys) > 5 else ''}" for name, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys)
        raise ValueError(f"{path}: state dict does not match its config ({detail})")
    model.load_state_dict(sd)
    return model.eval(), ckpt
