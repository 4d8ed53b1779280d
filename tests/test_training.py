"""Training jobs: pretraining and fine-tuning run, checkpoint and resume (tiny settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.conftest import TINY_ENCODER  # noqa: E402


def test_pretrain_resumes_and_finetune_produces_a_loadable_model(mini_corpus, tmp_path):
    from models.ssl import load_checkpoint, load_encoder
    from training.pretraining.finetune import FinetuneConfig, finetune
    from training.pretraining.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(corpus=str(mini_corpus), out=str(tmp_path / "pt"), encoder=dict(TINY_ENCODER),
                         n_clusters=8, batch_size=2, max_steps=2, checkpoint_every=1, crop_seconds=1.0, bf16=False,
                         mix_prob=0.5, channel_prob=0.5, contrast_weight=0.5)
    pretrain(cfg)
    first = torch.load(tmp_path / "pt" / "last.pt", weights_only=False)
    assert first["step"] == 2
    cfg.max_steps = 4  # resume: continues from step 2, same targets, same config file
    encoder_dir = pretrain(cfg)
    resumed = torch.load(tmp_path / "pt" / "last.pt", weights_only=False)
    assert resumed["step"] == 4 and [h[0] for h in resumed["history"]] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "pt" / "config.json").read_text())["max_steps"] == 4
    family, _ = load_encoder(encoder_dir)
    assert family == "wavlm"
    from training.pretraining.pretrain import publish

    published = publish(tmp_path / "pt", tmp_path / "published", "python -m training.pretraining.pretrain ...")
    prov = json.loads((published / "provenance.json").read_text())
    assert prov["command"] == "python -m training.pretraining.pretrain ..." and prov["summary"]["steps"] == 4
    assert prov["kind"] == "SSL-pretrained encoder (no speaker supervision)"
    assert prov["config"]["max_steps"] == 4 and load_encoder(published)[0] == "wavlm"
    from training.pretraining.pretrain import main

    assert main(["--corpus", str(mini_corpus), "--out", str(tmp_path / "cli"), "--max-steps", "0", "--layers", "1",
                 "--n-clusters", "4", "--crop-seconds", "1.0", "--batch-size", "2", "--no-bf16",
                 "--publish", str(tmp_path / "via-cli")]) == 0
    assert "--publish" in json.loads((tmp_path / "via-cli" / "provenance.json").read_text())["command"]
    with pytest.raises(FileNotFoundError, match="no finished encoder"):
        publish(tmp_path / "ft", tmp_path / "nothing", "x")

    ft = FinetuneConfig(corpus=str(mini_corpus), encoder=str(encoder_dir), out=str(tmp_path / "ft"), embedding_dim=16,
                        batch_size=2, max_steps=2, crop_seconds=1.0, bf16=False)
    with pytest.raises(ValueError, match="teacher's embedding size 256"):
        finetune(ft)
    ft.embedding_dim = 256
    path = finetune(ft)
    model, ckpt = load_checkpoint(path)
    assert model.embedding_dim == 256 and ckpt["training"]["finetune_summary"]["steps"] == 2
    assert (tmp_path / "ft" / "teacher.npy").exists()


def test_second_iteration_continues_from_the_encoder_on_its_own_feature_clusters(mini_corpus, tmp_path):
    from models.ssl import build_encoder, load_encoder
    from training.pretraining.pretrain import PretrainConfig, pretrain

    base = dict(corpus=str(mini_corpus), n_clusters=6, batch_size=2, crop_seconds=1.0, bf16=False)
    first = pretrain(PretrainConfig(out=str(tmp_path / "it1"), encoder=dict(TINY_ENCODER), max_steps=1, **base))
    layers = TINY_ENCODER["num_hidden_layers"]
    with pytest.raises(ValueError, match="target_layer 2 needs init_encoder"):
        pretrain(PretrainConfig(out=str(tmp_path / "x"), target_layer=2, **base))
    with pytest.raises(ValueError, match=f"target_layer {layers + 1} is not a layer"):
        pretrain(PretrainConfig(out=str(tmp_path / "y"), init_encoder=str(first), target_layer=layers + 1, **base))
    unmaskable = tmp_path / "nomask"
    build_encoder("wavlm", {**TINY_ENCODER, "mask_time_prob": 0.0}).save_pretrained(unmaskable)
    with pytest.raises(ValueError, match="has no mask embedding"):
        pretrain(PretrainConfig(out=str(tmp_path / "z"), init_encoder=str(unmaskable), **base))
    cfg = PretrainConfig(out=str(tmp_path / "it2"), init_encoder=str(first), target_layer=layers, max_steps=0, **base)
    second = pretrain(cfg)  # zero steps: the saved encoder is the first iteration's, unchanged
    _, a = load_encoder(first)
    _, b = load_encoder(second)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    z = np.load(tmp_path / "it2" / "targets.npz")
    assert z["centroids"].shape == (6, TINY_ENCODER["hidden_size"])  # clusters of the encoder's features, not MFCC
    summary = json.loads((tmp_path / "it2" / "summary.json").read_text())
    assert summary["targets"] == f"layer {layers} of {first}"
    assert summary["init_run"]["summary"]["targets"] == "MFCC" and summary["init_run"]["config"]["max_steps"] == 1


def test_pretrain_bad_corpus(tmp_path):
    from training.pretraining.pretrain import main

    assert main(["--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2


def test_bf16_autocast_only_where_the_cpu_has_it(tmp_path, capsys):
    from training.common import cpu_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("flags : fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_bf16(True, "job", info) and not cpu_bf16(False, "job", info)
    info.write_text("flags : fpu sse avx2\n")
    assert not cpu_bf16(True, "pretrain", info)
    assert "pretrain: this CPU has no native bf16" in capsys.readouterr().out
    assert not cpu_bf16(True, "job", tmp_path / "missing")


def test_utterance_mixing_overlays_another_voice_at_the_stated_energy_ratio():
    from training.pretraining.pretrain import PretrainConfig, pretrain
    from training.pretraining.pretrain_data import mix_utterances

    rng = np.random.default_rng(0)
    clean = np.sin(np.linspace(0, 400, 8000, dtype=np.float32))[None].repeat(64, 0)  # (64, T) primary crops
    other = [np.random.default_rng(1).normal(size=20000).astype(np.float32)]
    assert np.array_equal(mix_utterances(clean.copy(), other, 0.0, rng), clean)  # prob 0: untouched
    mixed = mix_utterances(clean.copy(), other, 1.0, rng)
    added = mixed - clean  # (64, T): the interferer alone
    for row, extra in zip(clean, added):
        touched = np.flatnonzero(extra)
        assert 800 <= len(touched) <= 4000  # one contiguous segment of a tenth to half the crop
        assert touched[-1] - touched[0] + 1 == len(touched)
        ratio_db = 10 * np.log10(np.mean(row ** 2) / np.mean(extra[touched] ** 2))
        assert -5.01 <= ratio_db <= 5.01
    some = mix_utterances(clean.copy(), other, 0.5, np.random.default_rng(3))
    changed = int((some != clean).any(1).sum())
    assert 16 <= changed <= 48  # about half the crops
    with pytest.raises(ValueError, match="mix_prob must be in \\[0, 1\\].*1.5"):
        pretrain(PretrainConfig(corpus="unused", out="unused", mix_prob=1.5))


def test_utterance_contrast_pulls_sibling_crops_together():
    from training.pretraining.pretrain import PretrainConfig, pretrain, utterance_contrast_loss

    pairs = torch.eye(8).repeat_interleave(2, 0)  # (16, 8): rows 2k, 2k+1 identical, pairs orthogonal
    assert utterance_contrast_loss(pairs, 0.1).item() < 1e-3
    swapped = pairs[torch.tensor([0, 2, 1, 3] + list(range(4, 16)))]  # rows 1 and 2 trade places
    assert utterance_contrast_loss(swapped, 0.1).item() > 1.0
    noise = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    assert abs(utterance_contrast_loss(noise[:64], 10.0).item() - np.log(63)) < 0.05  # chance: log(B - 1)
    with pytest.raises(ValueError, match="pairs of crops.*15"):
        utterance_contrast_loss(pairs[:15], 0.1)
    with pytest.raises(ValueError, match="even batch_size.*batch_size 15"):
        pretrain(PretrainConfig(corpus="unused", out="unused", contrast_weight=1.0, batch_size=15))


def test_contrast_head_linear_is_one_map_and_unknown_heads_are_refused():
    from models.ssl import build_encoder
    from training.pretraining.pretrain import MaskedPredictor, PretrainConfig, main, pretrain, projection_head

    encoder = build_encoder("wavlm", dict(TINY_ENCODER))
    h = encoder.config.hidden_size
    linear = MaskedPredictor(encoder, 8, contrast=True, contrast_head="linear").proj
    assert isinstance(linear, torch.nn.Linear) and (linear.in_features, linear.out_features) == (h, 128)
    mlp = MaskedPredictor(encoder, 8, contrast=True).proj
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear"]
    wave = torch.randn(2, 16000)  # (B, T)
    frames = encoder._get_feat_extract_output_lengths(torch.tensor(16000)).item()
    _, z, d = MaskedPredictor(encoder, 8, contrast=True, contrast_head="linear")(wave, torch.zeros(2, frames, dtype=torch.bool))
    assert z.shape == (2, 128) and d is None
    with pytest.raises(ValueError, match="contrast_head.*'deep'"):
        pretrain(PretrainConfig(corpus="unused", out="unused", contrast_weight=1.0, contrast_head="deep"))
    with pytest.raises(ValueError, match="contrast_head.*'deep'"):
        projection_head("deep", h)
    with pytest.raises(SystemExit) as e:  # the CLI offers exactly the known heads
        main(["--corpus", "unused", "--out", "unused", "--contrast-head", "deep"])
    assert e.value.code == 2


def test_channel_augmentation_changes_some_crops_and_keeps_their_length():
    from training.pretraining.pretrain import PretrainConfig, pretrain
    from training.pretraining.pretrain_data import through_channels

    clean = np.random.default_rng(0).normal(scale=0.1, size=(40, 16000)).astype(np.float32)  # (40, T)
    assert np.array_equal(through_channels(clean.copy(), 0.0, np.random.default_rng(1)), clean)
    out = through_channels(clean.copy(), 0.5, np.random.default_rng(2), [clean[0]])
    assert out.shape == clean.shape and np.isfinite(out).all()
    changed = int((np.abs(out - clean) > 1e-4).any(1).sum())
    assert 10 <= changed <= 30  # about half the crops
    silent = np.zeros((2, 16000), np.float32)  # nothing to filter: left as it is
    assert not through_channels(silent, 1.0, np.random.default_rng(3)).any()
    with pytest.raises(ValueError, match="channel_prob must be in \\[0, 1\\].*-0.1"):
        pretrain(PretrainConfig(corpus="unused", out="unused", channel_prob=-0.1))


def test_frame_distill_loss_scores_every_frame_against_its_crop_target():
    from training.pretraining.distill import frame_distill_loss

    target = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)  # (B, D)
    aligned = target.unsqueeze(1).expand(3, 5, 16) * 4.0  # (B, T', D): every frame points at its target
    assert frame_distill_loss(aligned, target).item() < 1e-6  # cosine: scale does not matter
    assert abs(frame_distill_loss(-aligned, target).item() - 2.0) < 1e-6
    half = aligned.clone()
    half[:, 2:] = -half[:, 2:]  # 2 of 5 frames right, 3 opposite -> mean of (0, 0, 2, 2, 2)
    assert abs(frame_distill_loss(half, target).item() - 1.2) < 1e-5
    with pytest.raises(ValueError, match="target"):
        frame_distill_loss(aligned, target[:2])
    # centred: only the part of each target that differs from the centre counts
    center = torch.ones(16)
    assert frame_distill_loss(aligned, target + center, center).item() < 1e-5
    assert frame_distill_loss(center.expand(3, 5, 16), target + center, center).item() > 0.5


def test_teacher_center_is_the_mean_embedding_of_random_crops():
    from training.pretraining.distill import teacher_center, teacher_targets

    class Spectrum(torch.nn.Module):  # a teacher whose embedding visibly depends on the crop
        def forward(self, wave, lengths):  # (B, T), (B,) -> (B, 256) unit vectors of the magnitude spectrum
            return torch.nn.functional.normalize(torch.fft.rfft(wave).abs()[:, 1:257], dim=1)

    teacher = Spectrum()
    t = np.arange(20000) / 16000
    waves = [(0.3 * np.sin(2 * np.pi * f * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
             for f in (150, 420, 900, 2500)]  # (20000,) each: different spectra, a slow envelope
    center = teacher_center(teacher, waves, 16000, 10, seed=3, batch=4)  # three batches: 4 + 4 + 2 crops
    assert center.shape == (256,)
    assert torch.allclose(center, teacher_center(teacher, waves, 16000, 10, seed=3, batch=10), atol=1e-6)
    draw = np.random.default_rng(3)  # the same crops by hand
    picks = [(int(i), int(draw.integers(0, 20000 - 16000 + 1))) for i in draw.integers(0, 4, 10)]
    emb = teacher_targets(teacher, np.stack([waves[i][s:s + 16000] for i, s in picks]))  # (10, D)
    assert torch.allclose(center, emb.mean(0), atol=1e-6)
    assert not torch.allclose(emb[0], emb.mean(0), atol=1e-3)  # the crops' embeddings do differ
    assert not torch.allclose(center, teacher_center(teacher, waves, 16000, 10, seed=4), atol=1e-4)
    with pytest.raises(ValueError, match="16000 samples"):
        teacher_center(teacher, [w[:8000] for w in waves], 16000, 10, seed=3)


def test_distillation_pretraining_trains_the_transformer_with_a_frozen_front_end(mini_corpus, tmp_path):
    from models.ge2e import GE2E
    from models.ssl import build_encoder
    from training.pretraining.distill import load_teacher, teacher_targets
    from training.pretraining.pretrain import PretrainConfig, main, pretrain, publish

    torch.manual_seed(0)
    teacher_pt = tmp_path / "teacher.pt"
    torch.save(GE2E().state_dict(), teacher_pt)  # a random GE2E in place of Resemblyzer's weights
    teacher = load_teacher(teacher_pt)
    crops = np.random.default_rng(0).standard_normal((3, 16000)).astype(np.float32) * 0.1
    emb = teacher_targets(teacher, crops)
    assert emb.shape == (3, 256) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="crops"):
        teacher_targets(teacher, crops[0])

    start = tmp_path / "start"
    build_encoder("wavlm", {**TINY_ENCODER, "mask_time_prob": 0.05}).save_pretrained(start)
    cfg = PretrainConfig(corpus=str(mini_corpus), out=str(tmp_path / "pt"), init_encoder=str(start), n_clusters=8,
                         batch_size=2, max_steps=2, crop_seconds=1.0, bf16=False, distill_weight=1.0,
                         teacher=str(teacher_pt), freeze_feature_encoder=True, distill_center=True)
    encoder_dir = pretrain(cfg)
    from models.ssl import load_encoder

    _, start_enc = load_encoder(start)
    _, after = load_encoder(encoder_dir)
    cnn = [k for k in start_enc.state_dict() if k.startswith("feature_extractor.")]
    moved = [k for k in start_enc.state_dict() if k.startswith("encoder.layers.")
             and not torch.equal(start_enc.state_dict()[k], after.state_dict()[k])]
    assert cnn and all(torch.equal(start_enc.state_dict()[k], after.state_dict()[k]) for k in cnn)  # frozen
    assert any(".feed_forward." in k for k in moved)  # the Transformer (its FFNs included) trained
    summary = json.loads((tmp_path / "pt" / "summary.json").read_text())
    assert summary["distill_weight"] == 1.0 and summary["freeze_feature_encoder"] and summary["distill_center"]
    assert np.load(tmp_path / "pt" / "teacher_center.npy").shape == (256,)
    prov = json.loads((publish(tmp_path / "pt", tmp_path / "pub", "x") / "provenance.json").read_text())
    assert "distillation" in prov["kind"]  # a distilled encoder is not labelled purely self-supervised
    later = PretrainConfig(corpus=str(mini_corpus), out=str(tmp_path / "later"), init_encoder=str(encoder_dir),
                           n_clusters=8, batch_size=2, max_steps=0, crop_seconds=1.0, bf16=False)
    pretrain(later)  # a run that continues a distilled one inherits the label
    assert "distillation" in json.loads((publish(tmp_path / "later", tmp_path / "pub2", "x") /
                                         "provenance.json").read_text())["kind"]
    with pytest.raises(ValueError, match="distill_weight.*-1"):
        pretrain(PretrainConfig(corpus="unused", out="unused", distill_weight=-1.0))
    assert main(["--corpus", str(mini_corpus), "--out", str(tmp_path / "x"), "--distill-weight", "1",
                 "--teacher", str(tmp_path / "nothing.pt")]) == 2  # stops before any work, naming the file
