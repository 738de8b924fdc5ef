"""The pretrain stage on the shared Ray cluster: 2 CPU workers, debug size, real DeepSpeed.

One synthetic corpus (tests/token_corpus.py) whose text is a function of its video, so the
loss visibly falls within a few dozen steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipelines import pretrain
from pipelines.common import EXIT_MISSING_INPUT
from tests.token_corpus import vocab_uri, write_corpus
from videobert.config import load_config
from videobert.registry import load_registered_model
from videobert.tracking import use_tracking_uri

COMMON = [
    "model.size=debug",
    "model.max_seq_len=64",
    "train.workers=2",
    "train.batch_size=32",
    "train.lr=0.003",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.seed=0",
    "codebook.k=4",
    "codebook.depth=2",
    "evaluate.holdout_fraction=0.1",
]


@pytest.fixture(scope="module")
def corpus_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    output = str(tmp_path_factory.mktemp("pretrain") / "out")
    write_corpus(output)
    return output


def config_for(output: str, tmp_path, *overrides: str):
    config = load_config(
        None,
        [
            f"output={output}",
            f"text.vocab={vocab_uri(output)}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            *COMMON,
            *overrides,
        ],
    )
    return config


def loss_history(run_id: str) -> list[float]:
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    return [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def assert_loss_falls(run_id: str) -> None:
    losses = loss_history(run_id)
    assert len(losses) >= 4, losses
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.3, f"loss did not fall: {losses}"


def test_zero2_bf16_loss_falls_and_rerun_resumes(ray_cluster, corpus_output, tmp_path):
    config = config_for(
        corpus_output,
        tmp_path,
        "train.zero_stage=2",
        "train.precision=bf16",
        "train.steps=20",
        "train.checkpoint_every=10",
        "train.run_name=zero2",
    )
    first = pretrain.run(config)
    assert first.start_step == 0 and first.metrics["step"] == 20
    assert_loss_falls(first.run_id)
    client = mlflow.MlflowClient()
    run = client.get_run(first.run_id)
    assert run.data.tags["codebook_version"] and run.data.params["train.zero_stage"] == "2"
    for key in (
        "mlm_loss_text",
        "mlm_loss_video",
        "mlm_loss_joint",
        "align_acc",
        "mlm_acc_video",
        "tokens_per_s",
        "lr",
    ):
        assert key in run.data.metrics, key
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(first.run_id)}
    version = client.get_model_version_by_alias("videobert", "candidate")
    assert str(version.version) == first.model_version

    # The same run name again, with more steps: it continues from step 20, not from 0.
    config.train.steps = 24
    second = pretrain.run(config)
    assert second.run_id == first.run_id
    assert second.start_step == 20 and second.metrics["step"] == 24
    assert int(second.model_version) == int(first.model_version) + 1
    model, vocab, meta = load_registered_model("models:/videobert@candidate")
    assert meta["steps"] == 24 and model.config.vocab_size == vocab.size

    # train.resume_from_champion: a new run starts from the champion's weights, not from scratch.
    client.set_registered_model_alias("videobert", "champion", second.model_version)
    config.train.steps, config.train.run_name, config.train.resume_from_champion = 2, "from-champion", True
    third = pretrain.run(config)
    assert third.run_id != first.run_id and third.start_step == 0
    assert client.get_run(third.run_id).data.tags["init_from"] == f"models:/videobert/{second.model_version}"
    scratch_loss, continued_loss = loss_history(first.run_id)[0], loss_history(third.run_id)[0]
    assert continued_loss < scratch_loss - 0.3, (scratch_loss, continued_loss)


def test_zero3_recovers_from_killed_worker(ray_cluster, corpus_output, tmp_path):
    marker = tmp_path / "killed-once"
    config = config_for(
        corpus_output,
        tmp_path,
        "train.zero_stage=3",
        "train.precision=fp32",
        "train.steps=16",
        "train.checkpoint_every=4",
        "train.max_failures=2",
        "train.run_name=zero3-fault",
    )

    def die_once(step: int, metrics: dict[str, float]) -> None:
        """Worker 1's process dies at step 10, once, as a lost node would make it; the
        replacement worker carries on. A closure, so Ray ships it by value to the workers."""
        import ray.train

        if ray.train.get_context().get_world_rank() == 1 and step == 10 and not marker.exists():
            marker.write_text(str(step))
            os._exit(1)

    result = pretrain.run(config, on_step=die_once)
    assert marker.read_text() == "10"  # worker 1 really died at step 10
    # The replacement resumed from a reported checkpoint (step 4 or 8), not from scratch, and finished.
    assert result.start_step in (4, 8) and result.metrics["step"] == 16
    assert_loss_falls(result.run_id)


def test_ray_job_submit_pretrain_on_s3(ray_cluster, s3_bucket, tmp_path):
    output = f"{s3_bucket}/out"
    write_corpus(output)
    config_file = tmp_path / "pretrain.yaml"
    config_file.write_text(
        "\n".join(
            [
                f"output: {output}",
                "model: {size: debug, max_seq_len: 64}",
                "codebook: {k: 4, depth: 2}",
                f"text: {{vocab: '{vocab_uri(output)}'}}",
                "train: {workers: 2, batch_size: 16, steps: 4, checkpoint_every: 2, zero_stage: 1, "
                "precision: fp32, run_name: job-submit}",
                f"mlflow: {{tracking_uri: 'sqlite:///{tmp_path}/mlflow.db', registered_model: job-model}}",
            ]
        )
    )
    env = {**ray_cluster.env, "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}
    done = ray_cluster.submit([sys.executable, "-m", "pipelines.pretrain", "--config", str(config_file)], env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    use_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    version = mlflow.MlflowClient().get_model_version_by_alias("job-model", "candidate")
    assert version.version is not None
    # Checkpoints went to the Ray Train storage on S3.
    from videobert import storage

    assert storage.list_files(f"{output}/train/job-submit", suffix="model_states.pt")


def test_missing_tokens_is_a_clear_missing_input_error(tmp_path):
    config = config_for(str(tmp_path / "empty"), tmp_path)
    assert pretrain.main([f"--set=output={tmp_path / 'empty'}", "--set=codebook.k=4"]) == EXIT_MISSING_INPUT
    with pytest.raises(Exception, match="no codebook"):
        pretrain.run(config)


ASK_OWN_STATE_API = """
import ray
from pipelines.common import init_ray


@ray.remote
class Probe:
    def ping(self) -> int:
        return 1


@ray.remote
def state_of(actor_id: str) -> str:
    from ray.util.state import get_actor

    return get_actor(actor_id, timeout=30).state


for _ in range(2):  # and again on a second private instance from the same process
    init_ray()
    actor = Probe.remote()
    ray.get(actor.ping.remote())
    print("STATE", ray.get(state_of.remote(actor._actor_id.hex())))
    ray.shutdown()
"""


def test_private_instance_workers_ask_their_own_state_api(ray_cluster):
    """`videobert run` without RAY_ADDRESS starts a private Ray: its workers (Ray Train's
    placement-group watcher among them) must reach that instance's state API, not the last
    `ray start` cluster on the machine (here the session's), or every Ray Train run ends ~14 s late."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run(
        [sys.executable, "-c", ASK_OWN_STATE_API], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.stdout.count("STATE ALIVE") == 2, done.stdout[-1000:] + done.stderr[-3000:]
