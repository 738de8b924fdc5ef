"""`model.video_input`: CBT's continuous video input (clip features through a projection,
InfoNCE on masked clips) next to the paper's visual words; examples, loss, evaluation, export,
and the join of token rows with extract's features. Fast: debug size, no Ray, no DeepSpeed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.token_corpus import NUM_VISUAL, TEXT_VOCAB, row_features, token_table, write_features
from videobert.config import ConfigError, ExamplesConfig, load_config
from videobert.evaluation import ZeroShotItem, cross_modal_eval, mlm_metrics, rows_to_columns, zero_shot
from videobert.model import (
    VIDEO_INPUT_WEIGHTS,
    JointVocab,
    build_model,
    export_hf,
    info_nce,
    init_from_videobert,
    load_pretrained,
    save_pretrained,
)
from videobert.token_shards import FeatureJoiner
from videobert.training import forward, pretraining_loss, to_device
from videobert.training_examples import ExampleBuilder

VOCAB = JointVocab(TEXT_VOCAB, NUM_VISUAL)


def columns(num_videos: int = 3, segments: int = 3, seed: int = 0) -> dict:
    table = token_table(num_videos=num_videos, segments=segments, seed=seed)
    return {**table.to_pydict(), "video_features": row_features(table)}


def test_info_nce_is_log_n_when_uninformative_and_falls_when_the_positive_matches() -> None:
    torch.manual_seed(0)
    targets = torch.randn(8, 16)
    uninformative = info_nce(torch.zeros(8, 16), targets, temperature=0.1)
    assert uninformative.mean().item() == pytest.approx(math.log(8), rel=1e-5)
    matching = info_nce(targets.clone(), targets, temperature=0.1)
    assert matching.mean().item() < 0.1 * math.log(8)
    # The same clip twice in a batch is not its own negative.
    doubled = torch.cat([targets[:4], targets[:4]])
    ids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert info_nce(doubled, doubled, 0.1, ids).mean() < info_nce(doubled, doubled, 0.1).mean() - 0.5
    assert info_nce(torch.zeros(0, 16), torch.zeros(0, 16), 0.1).shape == (0,)


def test_features_model_reads_projected_features_not_visual_words() -> None:
    ids = torch.tensor([[2, VOCAB.text_ids(3), 5, VOCAB.video_ids(1), VOCAB.video_ids(2), 3]])
    types = torch.tensor([[0, 0, 0, 1, 1, 1]])
    positions = torch.tensor([3, 4])
    feats = torch.randn(2, 1024)
    other_words = ids.clone()
    other_words[0, 3:5] = torch.tensor(VOCAB.video_ids(np.array([7, 9])))
    for kind, words_matter in (("features", False), ("both", True)):
        model = build_model("debug", VOCAB, 16, video_input=kind).eval()
        with torch.no_grad():
            a = model.encode(ids, types, feature_positions=positions, features=feats)
            b = model.encode(other_words, types, feature_positions=positions, features=feats)
            c = model.encode(ids, types, feature_positions=positions, features=torch.randn(2, 1024))
        assert torch.allclose(a, b) != words_matter, kind
        assert not torch.allclose(a, c), kind  # the features always matter
        with pytest.raises(ValueError, match="takes clip features"):
            model.encode(ids, types)
    tokens = build_model("debug", VOCAB, 16)
    assert not any(name.startswith("feature_projection") for name in tokens.state_dict())
    with pytest.raises(ConfigError, match="video_input"):
        load_config(None, ["model.video_input=pixels"])


@pytest.mark.parametrize("kind", ["features", "both"])
def test_examples_feed_features_and_target_masked_clips(kind: str) -> None:
    cols = columns()
    batch = ExampleBuilder(VOCAB, 64, ExamplesConfig(), kind).batch(cols, np.random.default_rng(0))
    is_video = batch["token_type_ids"].reshape(-1) == 1
    video_words = VOCAB.is_video(batch["input_ids"].reshape(-1))
    fed = np.zeros_like(is_video)
    fed[batch["feature_positions"]] = True
    assert (fed <= is_video).all() and fed.sum() >= 0.7 * video_words.sum()
    assert len(batch["features"]) == len(batch["feature_positions"])
    assert batch["features"].shape[1] == 1024 and len(batch["nce_positions"]) > 0
    # A masked-out clip ([MASK]) gets no feature; every InfoNCE target is a video position.
    masked = batch["input_ids"].reshape(-1) == 4
    assert not (fed & masked).any() and is_video[batch["nce_positions"]].all()
    # `features` drops the visual-word targets (no visual-word input), `both` keeps them.
    assert batch["mlm_is_video"].any() == (kind == "both")
    # A feature fed is the true feature of one of the batch's clips.
    pool = np.concatenate(cols["video_features"]).astype(np.float32)
    assert (np.abs(batch["nce_features"][:, None] - pool[None]).sum(-1).min(1) == 0).all()
    model = build_model("debug", VOCAB, 64, video_input=kind)
    loss, parts = pretraining_loss(forward(model, to_device(batch, "cpu")), to_device(batch, "cpu"))
    loss.backward()
    assert torch.isfinite(loss) and "nce_loss" in parts
    assert model.feature_projection.dense.weight.grad.abs().sum() > 0
    assert model.contrastive_head.decoder.weight.grad.abs().sum() > 0


def test_tokens_examples_are_unchanged_by_a_features_column() -> None:
    cols = columns()
    plain = {k: v for k, v in cols.items() if k != "video_features"}
    a = ExampleBuilder(VOCAB, 64).batch(plain, np.random.default_rng(3))
    b = ExampleBuilder(VOCAB, 64).batch(cols, np.random.default_rng(3))
    assert sorted(a) == sorted(b) and "features" not in a
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="without clip features"):
        ExampleBuilder(VOCAB, 64, video_input="features").batch(plain, np.random.default_rng(0))


def test_feature_joiner_finds_each_rows_clips_and_refuses_stale_features(tmp_path) -> None:
    table = token_table(num_videos=2, segments=3)
    write_features(str(tmp_path), table)
    joined = FeatureJoiner(str(tmp_path))(table.to_pydict())
    expected = row_features(table)
    assert all(np.array_equal(a, b) for a, b in zip(joined["video_features"], expected, strict=True))
    stale = table.to_pydict()
    stale["video_tokens"][0] = stale["video_tokens"][0] + [1]
    with pytest.raises(ValueError, match="rerun tokenize"):
        FeatureJoiner(str(tmp_path))(stale)
    with pytest.raises(ValueError, match="cannot read its clip features"):
        FeatureJoiner(str(tmp_path / "nowhere"))(table.to_pydict())


def test_evaluation_and_zero_shot_feed_features(tmp_path) -> None:
    table = token_table(num_videos=3, segments=3)
    write_features(str(tmp_path), table)
    model = build_model("debug", VOCAB, 64, video_input="features").eval()
    rows = rows_to_columns(table, FeatureJoiner(str(tmp_path)))
    assert len(rows.columns["video_features"]) == rows.num_rows
    metrics = mlm_metrics(model, VOCAB, rows, 64)
    assert 0 <= metrics["video_nce_accuracy"] <= 1 and math.isnan(metrics["video_mlm_accuracy"])
    cross, _ = cross_modal_eval(model, VOCAB, rows, 64)
    assert 0 <= cross["alignment_auc"] <= 1
    feats = row_features(table)
    items = [
        ZeroShotItem(f"video00{v}", sum(table["video_tokens"].to_pylist()[3 * v : 3 * v + 3], []), verb, obj)
        for v, (verb, obj) in enumerate([("w7", "w8"), ("w9", "w8"), ("w7", "w10")])
    ]
    for v, item in enumerate(items):
        item.features = np.concatenate(feats[3 * v : 3 * v + 3])
    encode = lambda text: [5 + int(w[1:]) if w.startswith("w") else 6 for w in text.split()]  # noqa: E731
    zs, details = zero_shot(model, VOCAB, encode, items, 64)
    assert zs["zero_shot_items"] == 3 and details["verb_scores"].shape == (3, 2)
    items[0].features = np.random.default_rng(1).standard_normal(items[0].features.shape)  # what it sees
    _, again = zero_shot(model, VOCAB, encode, items, 64)
    assert not np.allclose(again["verb_scores"][0], details["verb_scores"][0])
    np.testing.assert_allclose(again["verb_scores"][1:], details["verb_scores"][1:], atol=1e-5)


def test_save_load_export_and_continue_a_features_model(tmp_path) -> None:
    model = build_model("debug", VOCAB, 32, video_input="features", seed=3).eval()
    save_pretrained(model, VOCAB, tmp_path / "ours")
    loaded, _ = load_pretrained(tmp_path / "ours")
    assert loaded.config.video_input == "features"
    torch.testing.assert_close(loaded.feature_projection.dense.weight, model.feature_projection.dense.weight)

    export_hf(model, VOCAB, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["video_input"] == "features"
    from safetensors.torch import load_file

    extra = load_file(str(tmp_path / "hf" / VIDEO_INPUT_WEIGHTS))
    torch.testing.assert_close(
        extra["feature_projection.dense.weight"], model.feature_projection.dense.weight
    )

    # A tokens model continues into a features one: the projection starts fresh.
    fresh = build_model("debug", VOCAB, 32, video_input="features", seed=4)
    projection = fresh.feature_projection.dense.weight.detach().clone()
    init_from_videobert(fresh, VOCAB, build_model("debug", VOCAB, 32, seed=5), VOCAB, same_codebook=True)
    torch.testing.assert_close(fresh.feature_projection.dense.weight, projection)
