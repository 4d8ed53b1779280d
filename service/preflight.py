"""Checks that a configuration can serve, shared by start-up and ``spkserve serve --check``.

``check_setup`` does everything start-up does short of binding ports and opening the speaker
store: the tokens file, key files, TLS files, the data directory, and every model the server
would load (its model.json, its ONNX session, a warm-up batch, the per-model settings, the
default model). Deploy pipelines run it before a rollout (``spkserve serve --check --config
FILE``; an init container in Kubernetes): one line naming the option or file at fault and
status 2, or a JSON summary and status 0.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.artifact import ArtifactError
from service.config import ConfigError, ServerConfig

__all__ = ["read_tls", "check_data_dir", "check_setup"]


def read_tls(key: str, cert: str) -> tuple[bytes, bytes]:
    """The server's private key and certificate chain (PEM); ConfigError naming the option that cannot be read."""
    out = []
    for name, path in (("tls_key", key), ("tls_cert", cert)):
        try:
            out.append(Path(path).read_bytes())
        except OSError as e:
            raise ConfigError(f"option '{name}' = {path!r}: cannot read it ({e.strerror})") from None
    return out[0], out[1]


def check_data_dir(path: Path, create: bool = True) -> None:
    """Create the data directory if needed (``create``; else only check that it could be); ConfigError naming
    ``data_dir`` when it cannot be made or written."""
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"option 'data_dir' = {str(path)!r}: cannot create it ({e.strerror})") from None
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"option 'data_dir' = {str(path)!r}: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write to it" if existing == path else f"create it (in {str(existing)!r})"
        raise ConfigError(f"option 'data_dir' = {str(path)!r}: this process (uid {os.geteuid()}) cannot {what}")


def check_setup(config: ServerConfig) -> dict:
    """Everything start-up checks but ports and the store; the summary ``serve --check`` prints.

    Raises:
        ConfigError / ArtifactError: naming the option or file at fault.
    """
    from models.runtime import SpeakerModel
    from service.auth import load_tokens
    from service.engine import configured_key_files, gpu_available
    from service.model_setup import model_policy, select_models

    tokens = 0
    if config.auth_tokens_file:
        try:
            tokens = len(load_tokens(config.auth_tokens_file))
        except ValueError as e:
            raise ConfigError(f"option 'auth_tokens_file': {e}") from None
    keys = configured_key_files(config)
    if config.tls_cert:
        read_tls(config.tls_key, config.tls_cert)
    if config.index_backend == "faiss":
        check_data_dir(Path(config.data_dir), create=False)  # a check writes nothing
    _, threads = config.inference_threads(gpu_available(config.providers))
    models = []
    for d in select_models(config):
        try:
            model = SpeakerModel(d, config.providers, config.model_variant, threads, config.inter_op_threads,
                                 config.ort_spinning)
            warmup_s = model.warmup()
        except ArtifactError:
            raise
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own errors: name the entry
            raise ArtifactError(f"{d}: cannot be served: {e}") from None
        policy = model_policy(config, model)
        models.append({"name": model.name, "version": model.card.version, "embedding_dim": model.dim,
                       "variant": model.variant, "provider": model.provider, "warmup_seconds": round(warmup_s, 3),
                       "vad": policy.vad is not None, "commercial_use": model.card.commercial_use})
    if config.default_model not in {m["name"] for m in models}:
        raise ArtifactError(f"option 'default_model': {config.default_model!r} is not among the models to load "
                            f"({[m['name'] for m in models]})")
    return {"ok": True, "models": models, "default_model": config.default_model,
            "auth": ("tokens file, %d tokens" % tokens if config.auth_tokens_file else
                     "one admin token" if config.auth_token else "none"),
            "key_files": len(keys), "tls": bool(config.tls_cert), "index_backend": config.index_backend,
            "data_dir": config.data_dir if config.index_backend == "faiss" else None}
