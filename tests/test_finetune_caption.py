"""`videobert finetune-caption`: captioners on a registered pretrained model, end to end, and the
parts of videobert/captioning.py on their own.

The stage's world is test_evalsets' (tests/labelled_world.py, built once per session): videos of
circles and squares under `source` (extracted), in another directory and on S3 (not extracted),
a text file named .mp4, and an untrained `debug` model registered as `videobert@candidate`. The
captions table gives each its narration's instruction over its first 3.5 s.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipelines import finetune_caption
from pipelines.common import EXIT_CONFIG
from tests.labelled_world import Evaluated
from videobert import captioning as cap
from videobert.classifier import LINEAGE_TAG
from videobert.config import CaptionerConfig, ConfigError, FinetuneConfig, load_config
from videobert.registry import CANDIDATE, CHAMPION, alias_version
from videobert.tracking import use_tracking_uri

CAPTIONER = "shapes-captioner"
# The stage's first test pays for the shared labelled world, a Ray Train run and pycocoevalcap's
# Java start-ups: minutes on a loaded 2-core box.
pytestmark = pytest.mark.timeout(1200)


def _caption(shape: str) -> str:
    return f"now let me show you how to slide the {shape}."


@pytest.fixture(scope="module")
def captioned(evaluated: Evaluated, tmp_path_factory: pytest.TempPathFactory):
    config = evaluated.config
    source = Path(config.source)
    notes = next(u for u, why in evaluated.unreadable.items() if why == "decode")
    rows = ["source_uri,start_s,end_s,caption,split,object"]
    rows += [
        f"{source / f'train{i}.mp4'},0,3.5,{_caption(s)},train,{s}"
        for i, s in enumerate(["circle", "square"])
    ]
    rows += [f"{u},0,3.5,{_caption(o)},train,{o}" for u, o in evaluated.scored.items() if "/in" not in u]
    rows += [f"{u},0,3.5,{_caption(o)},test,{o}" for u, o in evaluated.scored.items() if "/in" in u]
    rows += [f"{notes},0,3.5,{_caption('circle')},train,circle"]
    table = tmp_path_factory.mktemp("captions") / "captions.csv"
    table.write_text("\n".join(rows) + "\n")
    settings = FinetuneConfig(
        captions=str(table),
        model_uri=f"models:/{evaluated.first.model_name}@{CANDIDATE}",
        captioner_name=CAPTIONER,
        log_every=10,
        captioner=CaptionerConfig(layers=1, hidden=32, heads=4, steps=20, batch_size=8, beam_size=2),
    )
    config = dataclasses.replace(config, finetune=settings)
    return config, finetune_caption.run(config)


def test_stage_registers_a_captioner_with_its_lineage_metrics_and_baselines(
    captioned, evaluated: Evaluated
) -> None:
    config, result = captioned
    use_tracking_uri(config.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    pretrained = f"models:/{evaluated.first.model_name}/{evaluated.first.version}"
    assert (result.version, result.pretrained_uri, result.skipped) == ("1", pretrained, False)
    assert (
        str(alias_version(client, CAPTIONER, CANDIDATE))
        == str(alias_version(client, CAPTIONER, CHAMPION))
        == "1"
    )
    tags = client.get_model_version(CAPTIONER, "1").tags
    assert tags[LINEAGE_TAG] == pretrained and tags["promotion.decision"] == "promoted"
    assert float(tags["eval.test_segments"]) == 2 and float(tags["eval.train_segments"]) == 5  # notes.mp4 out
    for name in cap.FEATURE_SETS:  # the three captioners side by side, every metric (Java is here)
        for metric in (*cap.METRIC_NAMES, "object_named"):
            assert f"{name}_{metric}" in result.metrics, (name, metric)
    assert result.metrics["test_cider"] == result.metrics["videobert_s3d_cider"]
    assert any("notes.mp4" in u and "decode" in why for u, why in result.unreadable.items())
    run = client.get_run(result.run_id)
    assert run.data.tags["stage"] == "finetune-caption" and "videobert_s3d_cider" in run.data.metrics
    for name in cap.FEATURE_SETS:  # each captioner's loss, logged live
        assert [m.step for m in client.get_metric_history(result.run_id, f"{name}_loss")] == [10, 20]
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "captioning")}
    assert {"captioning/report.md", "captioning/samples.json", "captioning/loss_curve.png"} <= artifacts
    report = mlflow.artifacts.load_text(f"runs:/{result.run_id}/captioning/report.md")
    assert "| VideoBERT + S3D |" in report and "| S3D |" in report and "CIDEr" in report
    described = client.get_model_version(CAPTIONER, "1").description
    assert "shapes-captioner v1" in described and "model.predict(videos)" in described


def test_rerun_trains_nothing(captioned) -> None:
    config, first = captioned
    use_tracking_uri(config.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    runs = len(client.search_runs([client.get_run(first.run_id).info.experiment_id]))
    again = finetune_caption.run(config)
    assert again.skipped and again.version == first.version
    assert len(client.search_model_versions(f"name='{CAPTIONER}'")) == 1
    assert len(client.search_runs([client.get_run(first.run_id).info.experiment_id])) == runs


def test_registered_captioner_captions_videos_and_names_errors(captioned, evaluated: Evaluated) -> None:
    config, _ = captioned
    use_tracking_uri(config.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{CAPTIONER}@{CHAMPION}")
    notes = next(u for u, why in evaluated.unreadable.items() if why == "decode")
    video = str(Path(config.source) / "in1.mp4")
    out = model.predict(pd.DataFrame({"video": [video, notes], "start_s": [0.0, None], "end_s": [3.5, None]}))
    assert list(out.columns) == ["caption", "error"] and len(out) == 2
    assert isinstance(out["caption"][0], str) and out["error"][0] is None
    assert out["caption"][1] is None and out["error"][1].startswith("decode:")


def test_features_videobert_parts_differ_from_s3d(captioned) -> None:
    """The registered version's own chain: the VideoBERT parts have the model's width, the S3D
    part the encoder's, and the template's [MASK] mean is not the video mean."""
    config, _ = captioned
    use_tracking_uri(config.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{CAPTIONER}/1").unwrap_python_model()
    hidden = model.model.config.hidden
    text, masks = model.template_ids(model.settings["template"])
    assert len(masks) == 5 and all(text[m] == 4 for m in masks)  # 4: [MASK]
    words = [np.array([0, 1, 2, 3]), np.array([3, 2])]
    video, masked = cap.segment_parts(model.model.eval(), model.vocab, text, masks, words, 64)
    assert video.shape == masked.shape == (2, hidden)
    assert not torch.allclose(video, masked) and not torch.allclose(video[0], video[1])
    s3d = cap.s3d_means([np.ones((3, 1024), np.float16), np.zeros((1, 1024), np.float16)])
    features, dims = cap.feature_matrix({"video": video, "text": masked, "s3d": s3d}, "videobert_s3d")
    assert dims == [hidden, hidden, 1024] and features.shape == (2, 2 * hidden + 1024)
    assert cap.feature_matrix({"s3d": s3d}, "s3d")[1] == [1024]


def test_unfrozen_pretrained_weights_train_with_the_captioner(captioned, evaluated: Evaluated) -> None:
    """`freeze_pretrained: false`: the VideoBERT model is in the captioner's graph and its
    fine-tuned weights come back for registration."""
    from videobert.model import weights_state_dict
    from videobert.registry import load_registered_model, resolve_model_version
    from videobert.tables import Layout

    config, result = captioned
    use_tracking_uri(config.mlflow.tracking_uri)
    pretrained = resolve_model_version(f"models:/{evaluated.first.model_name}/{evaluated.first.version}")
    meta = pretrained.metadata
    captioner = dataclasses.replace(config.finetune.captioner, freeze_pretrained=False, steps=2)
    words = [np.array([0, 1, 2]), np.array([3, 2, 1, 0])]
    s3d = [np.full((3, 1024), 1e-3, np.float16), np.zeros((4, 1024), np.float16)]
    captions = ["slide the circle", "lift the square"]
    task = cap.CaptionTask(
        settings=dataclasses.replace(config.finetune, captioner=captioner),
        model_uri=pretrained.uri,
        tokenizer_uri=meta.get("tokenizer_uri") or Layout(config.output).tokenizer(meta["tokenizer_version"]),
        s3=config.s3,
        tracking_uri=config.mlflow.tracking_uri,
        run_id=result.run_id,
        vocab=cap.CaptionVocab.build(captions).words,
        train_words=words,
        train_s3d=s3d,
        train_captions=captions,
        test_words=words,
        test_s3d=s3d,
        feature_sets=(cap.REGISTERED,),
    )
    trained = cap.train_captioners(task, log_metrics=False)
    assert set(trained.states) == {cap.REGISTERED} and len(trained.test_captions[cap.REGISTERED]) == 2
    assert trained.encoder is not None
    before = weights_state_dict(load_registered_model(pretrained.uri)[0])
    assert any(not torch.equal(before[k], trained.encoder[k]) for k in before)


# ---- the library on its own (no Ray, no MLflow) -------------------------------------------------


@pytest.mark.parametrize(
    "text, column",
    [
        ("source_uri,start_s,end_s\n/v/a.mp4,0,2\n", "caption"),
        (
            "source_uri,start_s,end_s,caption,split\n/v/a.mp4,0,2,cut it,train\n/v/b.mp4,0,2,,test\n",
            "`caption`, row 2",
        ),
        (
            "source_uri,start_s,end_s,caption,split\n/v/a.mp4,3,2,cut it,train\n/v/b.mp4,0,2,x,test\n",
            "start_s",
        ),
        ("source_uri,start_s,end_s,caption,split\n/v/a.mp4,0,2,cut it,dev\n", "`split`, row 1"),
    ],
)
def test_bad_table_is_a_config_error_naming_the_column(
    tmp_path: Path, text: str, column: str, capsys
) -> None:
    table = tmp_path / "captions.csv"
    table.write_text(text)
    config = load_config(None, [f"output={tmp_path / 'out'}", f"finetune.captions={table}"])
    with pytest.raises(ConfigError, match=column):
        cap.read_captions_table(str(table), config)
    assert (
        finetune_caption.main([f"--set=output={tmp_path / 'out'}", f"--set=finetune.captions={table}"])
        == EXIT_CONFIG
    )
    assert column.split(",")[0] in capsys.readouterr().err


def test_hold_out_is_by_video_and_deterministic(tmp_path: Path) -> None:
    table = tmp_path / "captions.csv"
    uris = [f"/videos/v{i}.mp4" for i in range(100)]
    table.write_text(
        "source_uri,start_s,end_s,caption\n" + "".join(f"{u},0,2,cut it\n{u},2,4,eat it\n" for u in uris)
    )
    config = load_config(None, [f"output={tmp_path}", "finetune.test_fraction=0.25"])
    first = cap.read_captions_table(str(table), config)
    assert [s.split for s in first] == [s.split for s in cap.read_captions_table(str(table), config)]
    assert all(first[2 * i].split == first[2 * i + 1].split for i in range(100))
    assert 10 <= sum(s.split == "test" for s in first[::2]) <= 45
    assert first[0].object is None and first[0].start_s == 0 and first[1].end_s == 4


def test_vocabulary_round_trip() -> None:
    vocab = cap.CaptionVocab.build(["Now let's cut the Onion.", "cut the bread"])
    assert vocab.words[:4] == list(cap.SPECIAL_WORDS) and vocab.words[4:7] == ["cut", "the", "'s"]
    ids = vocab.encode("now let's cut the tomato", 10)
    assert ids[0] == cap.BOS and ids[-1] == cap.EOS and cap.UNK in ids
    assert vocab.decode(ids) == "now let 's cut the"
    assert cap.CaptionVocab.from_json(vocab.to_json()).words == vocab.words


def _tiny_world(seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Three segment kinds, tiny S3D-like features (~1e-7), one caption each."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 12, generator=generator) * 1e-7
    features = centres.repeat_interleave(4, 0) + torch.randn(12, 12, generator=generator) * 1e-8
    captions = [
        f"now let me show you how to {v} the {o}."
        for v, o in [("slide", "circle"), ("lift", "square"), ("spin", "star")]
    ]
    return features, [c for c in captions for _ in range(4)]


def _fit(
    model: cap.CaptionModel, features: torch.Tensor, targets: torch.Tensor, steps: int, lr: float
) -> list[float]:
    """Full-batch Adam on the caption loss; the loss of every step."""
    optimizer = torch.optim.Adam(model.parameters(), lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = cap.caption_loss(model, features, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_captioner_learns_a_tiny_mapping_and_beam_one_is_greedy() -> None:
    features, captions = _tiny_world()
    vocab = cap.CaptionVocab.build(captions)
    targets = cap.caption_tensor(vocab, captions, 12)
    torch.manual_seed(0)
    model = cap.CaptionModel([8, 4], len(vocab), hidden=32, layers=1, heads=4, dropout=0.1, max_words=12)
    model.standardise_with(features)
    losses = _fit(model, features, targets, steps=120, lr=3e-3)
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    model.eval()
    greedy = cap.greedy_decode(model, features, 12)
    assert greedy == cap.beam_decode(model, features, 12, 1)
    assert [vocab.decode(i) for i in greedy] == [" ".join(cap.caption_words(c)) for c in captions]
    beam = [vocab.decode(i) for i in cap.decode_captions(model, features, 12, 3)]
    assert beam == [" ".join(cap.caption_words(c)) for c in captions]
    rebuilt = cap.CaptionModel.from_settings(model.settings())
    rebuilt.load_state_dict(model.state_dict())
    assert cap.greedy_decode(rebuilt.eval(), features, 12) == greedy


REFERENCES = {
    "a": ["now let me show you how to slide the circle.", "slide the red circle"],
    "b": ["now let me show you how to lift the square."],
    "c": ["now, let's spin the star!"],
}
CANDIDATES = {
    "a": "now let me show you how to slide the circle",
    "b": "lift the circle",
    "c": "now let's spin the star",
}


def test_scores_are_pycocoevalcap_s() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not cap.java_available():
        pytest.skip("no java here")
    meteor = Meteor()  # its Java loads (about 11 s) while ours does
    ours = cap.score_captions(REFERENCES, CANDIDATES)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": CANDIDATES[k]}] for k in REFERENCES})
    bleu = Bleu(4).compute_score(gts, res)[0]
    expected = {
        "bleu3": bleu[2],
        "bleu4": bleu[3],
        "meteor": meteor.compute_score(gts, res)[0],
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }
    assert ours.missing == {} and ours.metrics == pytest.approx(expected, abs=1e-12)
    assert cap.object_named_rate(list(CANDIDATES.values()), ["circle", "square", None]) == 0.5
    assert cap.object_named_rate(["x"], [None]) is None


def test_without_java_metrics_but_meteor_are_reported(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on it
    monkeypatch.setattr(cap, "_JAVA_WARNED", False)
    with caplog.at_level(logging.WARNING):
        first = cap.score_captions(REFERENCES, CANDIDATES)
        second = cap.score_captions(REFERENCES, CANDIDATES)
    assert set(first.metrics) == {"bleu3", "bleu4", "rouge_l", "cider"} and "meteor" in first.missing
    assert "java" in first.missing["meteor"] and first.metrics == second.metrics
    assert sum("METEOR" in r.message for r in caplog.records) == 1  # said once
    assert 0 < first.metrics["cider"] and 0 < first.metrics["bleu3"] <= 1


def test_config_keys_and_their_checks() -> None:
    config = load_config(None, ["finetune.captioner.steps=7", "finetune.captioner.freeze_pretrained=false"])
    assert config.finetune.captioner.steps == 7 and not config.finetune.captioner.freeze_pretrained
    assert config.finetune.captioner_name == "videobert-captioner" and config.finetune.captions is None
    assert (config.finetune.captioner.hidden, config.finetune.captioner.dropout) == (128, 0.4)
    with pytest.raises(ConfigError, match="multiple of heads"):
        load_config(None, ["finetune.captioner.hidden=100"])
    with pytest.raises(ConfigError, match="unknown config key finetune.captioner.depth"):
        load_config(None, ["finetune.captioner.depth=3"])


def test_demo_captions_are_the_instruction_sentences() -> None:
    from videobert.demo_corpus import OBJECTS, DemoSpec, instruction_cue, narration, plan_corpus

    spec = DemoSpec(objects=len(OBJECTS), actions=5, videos_per_class=2)
    for video in plan_corpus(spec):
        cue = instruction_cue(video, narration(video, spec))
        assert cue.text == f"now let me show you how to {video.verb} the {video.object}.", cue
        assert 0 <= cue.start_s < cue.end_s <= spec.seconds


def test_mlflow_models_serve_captions_a_video_uri_over_http(captioned, evaluated: Evaluated) -> None:
    """`mlflow models serve -m models:/videobert-captioner@champion`, a real server: a video
    path posted as JSON gets the caption that the loaded pyfunc gives it; an unreadable file an
    error row, not a failed request."""
    from tests.processes import model_server, post_json

    config, _ = captioned
    use_tracking_uri(config.mlflow.tracking_uri)
    video = str(Path(config.source) / "in1.mp4")
    notes = next(u for u, why in evaluated.unreadable.items() if why == "decode")
    expected = mlflow.pyfunc.load_model(f"models:/{CAPTIONER}@{CHAMPION}").predict(
        pd.DataFrame({"video": [video], "start_s": [0.0], "end_s": [3.5]})
    )
    with model_server(f"models:/{CAPTIONER}@{CHAMPION}", config.mlflow.tracking_uri) as url:
        frame = {"columns": ["video", "start_s", "end_s"], "data": [[video, 0.0, 3.5], [notes, None, None]]}
        rows = post_json(f"{url}/invocations", {"dataframe_split": frame})["predictions"]
    assert rows[0]["caption"] == expected["caption"][0] and rows[0].get("error") is None
    assert rows[1].get("caption") is None and rows[1]["error"].startswith("decode:")


def test_beam_search_does_not_stop_at_the_first_short_hypotheses() -> None:
    """12 captions sharing a long prefix: hypotheses that skip a word and end early finish
    first. Beam search must still return the likelier full caption (a regression: it once
    stopped as soon as `beam` hypotheses had finished, and captioned "now let me ring")."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    verbs, objects = ["slide", "lift", "spin"], ["circle", "square", "star", "ring"]
    classes = rng.integers(0, 12, 48)
    features = torch.randn(48, 64) + 3 * F.one_hot(torch.as_tensor(classes), 64).float()
    captions = [f"now let me show you how to {verbs[c % 3]} the {objects[c // 3]}." for c in classes]
    vocab = cap.CaptionVocab.build(captions)
    targets = cap.caption_tensor(vocab, captions, 20)
    model = cap.CaptionModel([64], len(vocab))
    model.standardise_with(features)
    _fit(model, features, targets, steps=200, lr=1e-3)
    model.eval()
    truth = [" ".join(cap.caption_words(c)) for c in captions[:8]]
    assert [vocab.decode(i) for i in cap.greedy_decode(model, features[:8], 20)] == truth
    assert [vocab.decode(i) for i in cap.beam_decode(model, features[:8], 20, 3)] == truth


def test_caption_loss_runs_to_the_longest_caption_and_ignores_padding() -> None:
    """The batch is cut to its longest caption: the decoder sees no all-padding column, and the
    loss equals the one over the whole padded width (padding is masked and not a target)."""
    torch.manual_seed(0)
    model = cap.CaptionModel([4, 3], vocab_size=12, hidden=16, heads=2, max_words=20).eval()
    features = torch.randn(5, 7)
    texts = ["a b c d", "a b", "c d e f g h", "e", "b c"]
    captions = cap.caption_tensor(cap.CaptionVocab.build(texts), texts, 20)
    assert captions.shape == (5, 22)
    widths = []
    model.register_forward_pre_hook(lambda _, args: widths.append(args[1].shape[1]))
    loss = cap.caption_loss(model, features, captions)
    assert widths == [7]  # <bos> + 6 words (the <eos> is only a target)
    with torch.no_grad():
        logits = model(features, captions[:, :-1])
        whole = F.cross_entropy(logits.reshape(-1, 12), captions[:, 1:].reshape(-1), ignore_index=cap.PAD)
    assert float(loss) == pytest.approx(float(whole), abs=1e-5)
