"""models/: GE2E against Resemblyzer, SSL loaders vs transformers, padding invariance,
checkpoints with per-layer FFN widths, export parity and loader errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

torch = pytest.importorskip("torch")

from models.artifact import ArtifactError, ModelCard  # noqa: E402
from models.export import export_model  # noqa: E402
from models.ssl import (  # noqa: E402
    SSLSpeakerConfig,
    XVectorSpeakerModel,
    build_encoder,
    build_model,
    ffn_layers,
    load_checkpoint,
    load_encoder,
    save_checkpoint,
)
from tests.conftest import REFERENCE, REPOSITORY, TINY_ENCODER  # noqa: E402


def reference():
    return json.loads((REFERENCE / "ge2e_reference.json").read_text())["utterances"]


def padded(waves):
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.as_tensor(w)
    return batch, lengths


# -- GE2E -----------------------------------------------------------------------------------

def test_committed_ge2e_onnx_matches_resemblyzer():
    import onnxruntime as ort

    sess = ort.InferenceSession(str(REPOSITORY / "ge2e" / "model.onnx"), providers=["CPUExecutionProvider"])
    refs = reference()
    waves = [sf.read(REFERENCE / r["file"], dtype="float32")[0] for r in refs.values()]
    batch, lengths = padded(waves)
    out = sess.run(["embedding"], {"waveform": batch.numpy(), "lengths": lengths.numpy()})[0]
    for row, r in zip(out, refs.values()):
        assert float(np.dot(row, r["embedding"])) > 0.999
    # and each alone
    for w, r in zip(waves, refs.values()):
        one = sess.run(["embedding"], {"waveform": w[None], "lengths": np.array([len(w)])})[0][0]
        assert float(np.dot(one, r["embedding"])) > 0.999


@pytest.fixture(scope="module")
def ge2e_torch():
    from models.ge2e import GE2E

    try:
        return GE2E.from_resemblyzer()
    except RuntimeError as e:  # the wheel is fetched from PyPI on first use
        pytest.skip(f"resemblyzer wheel unavailable: {e}")


def test_ge2e_torch_matches_resemblyzer_and_is_padding_invariant(ge2e_torch):
    refs = reference()
    waves = [sf.read(REFERENCE / r["file"], dtype="float32")[0] for r in refs.values()]
    with torch.no_grad():
        batch = ge2e_torch(*padded(waves)).numpy()
    for row, w, r in zip(batch, waves, refs.values()):
        assert float(np.dot(row, r["embedding"])) > 0.9999
        with torch.no_grad():
            alone = ge2e_torch(torch.from_numpy(w)[None], torch.tensor([len(w)]))[0].numpy()
        assert float(np.dot(row, alone)) > 0.99999


def test_ge2e_partial_counts_follow_resemblyzer(ge2e_torch):
    """Resemblyzer's compute_partial_slices, re-derived by hand for a few lengths."""
    def slices(n):
        n_frames = int(np.ceil((n + 1) / 160))
        steps = max(1, n_frames - 160 + 77 + 1)
        starts = list(range(0, steps, 77))
        coverage = (n - starts[-1] * 160) / (160 * 160)
        return len(starts) - (1 if coverage < 0.75 and len(starts) > 1 else 0)

    lengths = [1, 1600, 25600, 25601, 40000, 44000, 160000, 161234]
    got = ge2e_torch.num_partials(torch.tensor(lengths)).tolist()
    assert got == [slices(n) for n in lengths]


# -- SSL loaders --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["wavlm", "hubert", "wav2vec2"])
def test_save_pretrained_loads_and_matches_transformers(family, tmp_path):
    torch.manual_seed(0)
    enc = build_encoder(family, dict(TINY_ENCODER)).eval()
    enc.save_pretrained(tmp_path / family)
    fam, loaded = load_encoder(tmp_path / family)
    assert fam == family
    x = torch.randn(1, 16000) * 0.1
    with torch.no_grad():
        want = enc(x, output_hidden_states=True)
        got = loaded(x, output_hidden_states=True)
    for a, b in zip(want.hidden_states, got.hidden_states):
        assert torch.allclose(a, b, atol=1e-6)
    # and the speaker model built on it runs the same encoder maths on an unpadded input
    model = build_model(SSLSpeakerConfig(family=family, encoder=loaded.config.to_dict(), embedding_dim=16))
    model.encoder.load_state_dict(enc.state_dict(), strict=False)
    model.eval()
    with torch.no_grad():
        states, mask = model.frames(x, torch.tensor([16000]))
    assert mask.all()
    assert torch.allclose(states[-1], want.last_hidden_state, atol=1e-5)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(tmp_path / "none")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert"):
        load_encoder(tmp_path / "d")
    with pytest.raises(ValueError, match="valid families"):
        build_model(SSLSpeakerConfig(family="conformer", encoder={}))


@pytest.mark.parametrize("family", ["wavlm", "hubert", "wav2vec2"])
def test_padding_invariance_needs_the_masked_group_norm(family):
    torch.manual_seed(1)
    model = build_model(SSLSpeakerConfig(family=family, encoder=dict(TINY_ENCODER), embedding_dim=16)).eval()
    waves = [torch.randn(n) * 0.1 for n in (16000, 7000, 23000)]
    batch, lengths = padded(waves)
    with torch.no_grad():
        together = model(batch, lengths)
        alone = torch.cat([model(w[None], torch.tensor([len(w)])) for w in waves])
        assert (together * alone).sum(1).min() > 0.99999
        # plain GroupNorm over the padded batch changes the short utterances: the masking matters
        model.frontend.group_norm = False
        naive = model(batch, lengths)
    assert (naive[1] * alone[1]).sum() < 0.9999


def test_checkpoint_round_trip_with_per_layer_widths(tmp_path):
    torch.manual_seed(2)
    model = build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(TINY_ENCODER), embedding_dim=16,
                                         ffn_widths=[100, 37])).eval()
    assert [ff.intermediate_dense.out_features for ff in ffn_layers(model.encoder)] == [100, 37]
    path = save_checkpoint(model, tmp_path / "m.pt")
    again, ckpt = load_checkpoint(path)
    assert ckpt["config"]["ffn_widths"] == [100, 37]
    x = torch.randn(2, 12000) * 0.1
    lens = torch.tensor([12000, 9000])
    with torch.no_grad():
        assert torch.allclose(model(x, lens), again(x, lens), atol=1e-6)
    # a state dict that does not fit its config is named
    bad = torch.load(path, weights_only=False)
    bad["config"]["ffn_widths"] = [100, 40]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_xvector_checkpoint_loads_as_is_and_exports(tmp_path):
    from transformers import WavLMConfig, WavLMForXVector

    torch.manual_seed(3)
    cfg = WavLMConfig(**TINY_ENCODER, use_weighted_layer_sum=True, tdnn_dim=(32, 32, 32), tdnn_kernel=(5, 3, 1),
                      tdnn_dilation=(1, 2, 1), xvector_output_dim=24, num_labels=4)
    hf = WavLMForXVector(cfg).eval()
    hf.save_pretrained(tmp_path / "sv")
    model = XVectorSpeakerModel.from_pretrained(tmp_path / "sv").eval()
    x = torch.randn(1, 20000) * 0.1
    with torch.no_grad():
        want = hf(x).embeddings
        got = model.raw_embedding(x, torch.tensor([20000]))
    assert torch.allclose(want, got, atol=1e-4)
    card = ModelCard(name="sv", version="t", sample_rate=16000, embedding_dim=24, family="wavlm-xvector")
    report = export_model(model, card, tmp_path / "repo" / "sv", int8=True)
    assert report["min_cosine"] > 0.9999 and report["batch_vs_single_min_cosine"] > 0.9999
    assert report["int8_min_cosine"] > 0.9


def test_export_refuses_to_overwrite_and_bad_onnx_is_named(tmp_path):
    from models.runtime import SpeakerModel
    from tests.conftest import export_tiny

    entry = export_tiny(tmp_path, "tiny")
    with pytest.raises(FileExistsError, match="--force"):
        export_tiny(tmp_path, "tiny")
    card = json.loads((entry / "model.json").read_text())
    assert card["parameters"] > 0 and card["evaluation"]["parity"]["batch_vs_single_min_cosine"] > 0.9999
    SpeakerModel(entry).warmup()
    (entry / "model.onnx").write_bytes(b"\x08\x01corrupt")
    with pytest.raises(ArtifactError, match="model.onnx"):
        SpeakerModel(entry)
    card["embedding_dim"] = 99
    (entry / "model.json").write_text(json.dumps(card))
    entry2 = export_tiny(tmp_path, "tiny2")
    card2 = json.loads((entry2 / "model.json").read_text())
    card2["embedding_dim"] = 99
    (entry2 / "model.json").write_text(json.dumps(card2))
    with pytest.raises(ArtifactError, match="99"):
        SpeakerModel(entry2)


@pytest.mark.gpu
def test_cuda_execution_provider_matches_cpu():
    """Runs where onnxruntime-gpu sees a CUDA device; skipped elsewhere (CI has none)."""
    import onnxruntime as ort

    from models.runtime import SpeakerModel

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider in this onnxruntime build / machine")
    gpu = SpeakerModel(REPOSITORY / "ge2e", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    if gpu.provider != "CUDAExecutionProvider":
        pytest.skip(f"CUDA provider available but session fell back to {gpu.provider}")
    cpu = SpeakerModel(REPOSITORY / "ge2e", ["CPUExecutionProvider"])
    waves = [sf.read(REFERENCE / r["file"], dtype="float32")[0] for r in reference().values()]
    a, b = gpu.embed(waves), cpu.embed(waves)
    assert float((a * b).sum(1).min()) > 0.9999
