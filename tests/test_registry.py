"""Registry round trip: log the pyfunc model, register it with alias `candidate`, load it back.

Through a SQLite store and through the live `mlflow server` fixture (HTTP).
"""

from __future__ import annotations

import os
import pickle

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from videobert.config import ExperimentConfig, load_config
from videobert.model import CLS, MASK, SEP, VIDEO_SEP, JointVocab, build_model
from videobert.registry import load_registered_model, log_and_register_model
from videobert.storage import ObjectInfo
from videobert.tracking import log_lineage, start_or_resume_run, token_digest, tracking_uri, use_tracking_uri


def round_trip(tracking_uri: str, output: str) -> None:
    config = ExperimentConfig(output=output)
    config.mlflow.tracking_uri = tracking_uri
    config.mlflow.registered_model = "videobert-test"
    vocab = JointVocab(["hello", "world", "cat", "dog"], 16)
    model = build_model("debug", vocab, max_positions=32, seed=3).eval()
    run_id, resumed = start_or_resume_run(config, "registry-test")
    assert not resumed
    files = [ObjectInfo(f"{output}/tokens/x/part-0.parquet", 10, "e1")]
    log_lineage(run_id, f"{output}/tokens/x", files, "cb1", "tok1")
    metadata = {"codebook_version": "cb1", "tokenizer_version": "tok1", "max_seq_len": 32}
    version = log_and_register_model(run_id, model, vocab, metadata, config, "videobert-test")
    # A second run with the same Ray Train name continues the same MLflow run.
    assert start_or_resume_run(config, "registry-test") == (run_id, True)

    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("videobert-test", "candidate").version) == version
    run = client.get_run(run_id)
    assert run.data.tags["codebook_version"] == "cb1"
    assert run.data.params["train.zero_stage"] == "2"
    assert run.inputs.dataset_inputs[0].dataset.digest == token_digest(files)

    pyfunc = mlflow.pyfunc.load_model("models:/videobert-test@candidate")
    t, v = vocab.text_ids, vocab.video_ids
    sequences = [
        [CLS, t(0), MASK, t(2), VIDEO_SEP, v(1), v(2), MASK, v(4), v(5), SEP],
        [CLS, v(3), MASK, SEP],
        [CLS] + [v(i % 16) for i in range(25)] + [SEP],
    ]
    out = pyfunc.predict(pd.DataFrame({"input_ids": sequences}))
    assert len(out) == 3
    assert all(len(e) == model.config.hidden for e in out["embedding"])
    assert [len(p) for p in out["mlm_predictions"]] == [2, 1, 0]
    assert all(0.0 < s < 1.0 for s in out["alignment_score"])

    # The plain loader gives the same weights; a row's result does not depend on its batch mates.
    loaded, loaded_vocab, meta = load_registered_model("models:/videobert-test@candidate")
    assert meta["codebook_version"] == "cb1" and loaded_vocab.tokens() == vocab.tokens()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    alone = pyfunc.predict(pd.DataFrame({"input_ids": [sequences[1]]}))
    np.testing.assert_allclose(alone["embedding"][0], out["embedding"][1], atol=1e-5)
    with torch.no_grad():
        ids = torch.tensor([sequences[1]])
        hidden = model.encode(ids, torch.ones_like(ids))
    np.testing.assert_allclose(out["embedding"][1], hidden[0].mean(0).numpy(), atol=1e-5)


def test_registry_round_trip_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_registry_uri(uri)
    try:
        round_trip(uri, str(tmp_path / "out"))
    finally:
        mlflow.set_registry_uri(None)


def test_registry_round_trip_live_server(mlflow_server, tmp_path):
    mlflow.set_registry_uri(mlflow_server)
    try:
        round_trip(mlflow_server, str(tmp_path / "out"))
    finally:
        mlflow.set_registry_uri(None)


def test_predict_rejects_empty_sequences():
    from videobert.registry import predict_frame

    vocab = JointVocab(4, 4)
    with pytest.raises(ValueError, match="non-empty"):
        predict_frame(build_model("debug", vocab, 16), vocab, pd.DataFrame({"input_ids": [[]]}))


def test_a_second_experiment_in_one_process_uses_its_own_store(tmp_path, monkeypatch):
    """MLflow 3's set_tracking_uri exports MLFLOW_TRACKING_URI; ours must not leak it."""
    from videobert.tracking import setup_experiment, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = load_config(None, [f"output={tmp_path / 'first'}"])
    second = load_config(None, [f"output={tmp_path / 'second'}"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://127.0.0.1:9/left-by-another-test")
    mlflow.set_registry_uri(None)  # what a test that used a live server leaves behind
    setup_experiment(first)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_registry_uri() == tracking_uri(first)
    assert tracking_uri(second) == f"sqlite:///{tmp_path / 'second' / 'mlflow.db'}"
    setup_experiment(second)
    assert mlflow.get_tracking_uri() == tracking_uri(second)


class Planted:
    """What a hostile registry file could hold: unpickling it runs code (here, makes a directory)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def test_internal_loading_never_unpickles_the_registered_pyfunc(tmp_path, monkeypatch):
    """load_registered_model (evaluate, embed, resume_from_champion) rebuilds the model from
    safetensors and JSON: with the pyfunc's pickled python model replaced by a hostile pickle in
    the store, it still loads the same weights, and the pickle never runs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    output = tmp_path / "out"
    config = load_config(None, [f"output={output}", "mlflow.registered_model=videobert-safe"])
    use_tracking_uri(tracking_uri(config))
    vocab = JointVocab(["hello", "world"], 8)
    model = build_model("debug", vocab, max_positions=16, seed=5).eval()
    run_id, _ = start_or_resume_run(config, "safe-load")
    version = log_and_register_model(
        run_id, model, vocab, {"codebook_version": "cb"}, config, "videobert-safe"
    )
    (pickled,) = (output / "mlartifacts").rglob("python_model.pkl")
    marker = tmp_path / "ran-on-load"
    pickled.write_bytes(pickle.dumps(Planted(str(marker))))

    loaded, loaded_vocab, meta = load_registered_model(f"models:/videobert-safe/{version}")
    assert not marker.exists()
    assert meta["codebook_version"] == "cb" and loaded_vocab.tokens() == vocab.tokens()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
