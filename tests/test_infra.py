"""Deployment files: they parse, run real entrypoints, schedule validly and hold no secret."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.cli import STAGES

REPO = Path(__file__).resolve().parent.parent
IMAGE_ROOT = "/app/"  # WORKDIR of infra/Dockerfile: the repo's files live here in the image
MANIFESTS = sorted((REPO / "infra").rglob("*.yaml")) + [REPO / "ray_cluster.yaml"]
JOB_STAGES = [stage for stage in STAGES if stage != "demo-corpus"]  # demo-corpus is local-only


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strings(node: Any) -> Iterator[str]:
    """Every string in a YAML tree; a list of strings (an argv) also as one joined command."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        if node and all(isinstance(item, str) for item in node):
            yield " ".join(node)
        for item in node:
            yield from strings(item)


def commands(path: Path) -> list[str]:
    """Every command-like string in a manifest (or the shell lines of a markdown file)."""
    if path.suffix in (".md", ".sh"):
        text = path.read_text().replace("\\\n", " ")
        return [line for line in text.splitlines() if "pipelines." in line or "videobert " in line]
    return [s for doc in load_all(path) for s in strings(doc) if "pipelines." in s or "videobert " in s]


PIPELINE_CALL = re.compile(r"python[\d.]* -m pipelines\.(\w+)(.*)")
# `videobert <stage>` in command position (not `kubectl -n videobert get ...`)
CLI_CALL = re.compile(r"(?:^|[;&|]|\$\(|\bexec )\s*(?:\S*/)?videobert ([a-z][\w-]*)(.*)", re.MULTILINE)
CONFIG_ARG = re.compile(r"--config[= ](\S+)")


def entrypoints(text: str) -> list[tuple[str, str]]:
    """(module under pipelines/, rest of the command line) for each stage invocation in `text`."""
    found = [(m.group(1), m.group(2)) for m in PIPELINE_CALL.finditer(text)]
    for match in CLI_CALL.finditer(text):
        stage = match.group(1)
        assert stage in STAGES, f"`videobert {stage}` is not a stage (known: {', '.join(STAGES)})"
        found.append((STAGES[stage], match.group(2)))
    return found


def module_has_main(module: str) -> bool:
    path = REPO / "pipelines" / f"{module}.py"
    if not path.is_file():
        return False
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)


def repo_path(config: str) -> Path:
    return REPO / (config[len(IMAGE_ROOT) :] if config.startswith(IMAGE_ROOT) else config)


CRON_FIELDS = [  # (name, low, high, names)
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
    ),
    ("day of week", 0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
]


def cron_errors(expression: str) -> list[str]:
    """Problems with a standard 5-field cron expression (Kubernetes' syntax); empty if valid."""
    fields = expression.split()
    if len(fields) != 5:
        return [f"{expression!r}: expected 5 fields, got {len(fields)}"]
    errors = []
    for text, (name, low, high, names) in zip(fields, CRON_FIELDS, strict=True):

        def value(token: str, name: str = name, low: int = low, high: int = high, names: dict = names) -> int:
            number = names.get(token.lower()) if token.lower() in names else int(token)
            if not low <= number <= high:
                raise ValueError(f"{name} {token} outside {low}-{high}")
            return number

        for part in text.split(","):
            try:
                base, _, step = part.partition("/")
                if step and int(step) < 1:
                    raise ValueError(f"{name} step {step} must be >= 1")
                if base != "*":
                    start, _, end = base.partition("-")
                    if end and value(start) > value(end):
                        raise ValueError(f"{name} range {base} is backwards")
                    value(start)
            except ValueError as error:
                errors.append(f"{expression!r}: {name} {part!r}: {error}")
    return errors


def test_every_manifest_parses() -> None:
    assert (REPO / "infra" / "kuberay" / "raycluster.yaml") in MANIFESTS
    for path in MANIFESTS:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        if path.name != "ray_cluster.yaml":
            for doc in docs:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object"
    assert (REPO / "configs" / "cluster.yaml").is_file()


def test_one_rayjob_per_stage_running_that_stage() -> None:
    for stage in JOB_STAGES:
        path = REPO / "infra" / "kuberay" / f"rayjob-{stage}.yaml"
        assert path.is_file(), f"no RayJob for stage {stage}"
        (job,) = load_all(path)
        assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
        modules = [module for module, _ in entrypoints(job["spec"]["entrypoint"])]
        assert modules == [STAGES[stage]], f"{path.name} runs {modules}"
        # jobs share the long-lived cluster and never delete it
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "videobert"}
        assert job["spec"]["shutdownAfterJobFinishes"] is False


def test_every_command_is_a_real_entrypoint_with_an_existing_config() -> None:
    """Strict: fails until every stage module that a manifest runs exists with a main()."""
    checked = set()
    for path in [*MANIFESTS, REPO / "infra" / "README.md", *sorted((REPO / "scripts").glob("*.sh"))]:
        for command in commands(path):
            for module, rest in entrypoints(command):
                assert module in STAGES.values(), f"{path.name}: pipelines.{module} is not a stage module"
                assert module_has_main(module), f"{path.name}: pipelines/{module}.py with a main() is missing"
                config = CONFIG_ARG.search(rest)
                assert config, f"{path.name}: `{command}` gives no --config"
                assert repo_path(config.group(1)).is_file(), f"{path.name}: config {config.group(1)} missing"
                checked.add(module)
    assert {STAGES[stage] for stage in JOB_STAGES} <= checked


def test_cluster_shape() -> None:
    docs = {doc["kind"]: doc for doc in load_all(REPO / "infra" / "kuberay" / "raycluster.yaml")}
    cluster = docs["RayCluster"]["spec"]
    assert cluster["rayVersion"] == version("ray"), "rayVersion must match the Ray the project pins"
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and groups["gpu"]["minReplicas"] == 0
    assert groups["gpu"]["maxReplicas"] > groups["gpu"]["minReplicas"]
    assert (
        "nvidia.com/gpu"
        not in groups["cpu-decode"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )
    assert docs["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::"
    )

    launcher = load_all(REPO / "ray_cluster.yaml")[0]
    nodes = launcher["available_node_types"]
    assert launcher["head_node_type"] in nodes and launcher["provider"]["type"] == "aws"
    assert nodes["gpu"]["min_workers"] == 0 and nodes["gpu"]["max_workers"] > 0
    assert nodes["cpu_decode"]["max_workers"] > 0
    for name, node in nodes.items():
        assert "Arn" in node["node_config"]["IamInstanceProfile"], f"{name}: S3 through an instance profile"
    assert launcher["docker"]["image"]


def test_one_image_everywhere() -> None:
    images = {
        s
        for path in MANIFESTS
        for doc in load_all(path)
        for s in strings(doc)
        if "videobert:" in s and "/" in s and " " not in s
    }
    assert len(images) == 1, f"manifests disagree on the image: {images}"


def test_cron_schedules_are_valid() -> None:
    schedules = {}
    for path in MANIFESTS:
        for doc in load_all(path):
            if isinstance(doc, dict) and doc.get("kind") in ("CronJob", "RayCronJob"):
                schedules[f"{path.name}:{doc['kind']}"] = doc["spec"]["schedule"]
    assert set(schedules) == {"cronjob-run.yaml:CronJob", "raycronjob-run.yaml:RayCronJob"}
    for where, schedule in schedules.items():
        assert cron_errors(schedule) == [], where
    # the validator itself rejects what Kubernetes would
    assert cron_errors("0 3 * *")
    assert cron_errors("60 3 * * *")
    assert cron_errors("0 3 * * mon-sun/0")
    assert cron_errors("0 5-2 * * *")
    assert cron_errors("*/15 0-6,22 1 jan,jul mon-fri") == []


SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
SECRET_WORDS = {"secret", "password", "passwd", "token", "credential", "credentials", "apikey"}


def secret_like(key: str) -> bool:
    """`aws_secret_access_key`, `dbPassword`, `auth-token`: yes; `segment_tokens`, `secretName`: no."""
    words = re.sub(r"([a-z])([A-Z])", r"\1_\2", key).lower().replace("-", "_").replace(".", "_").split("_")
    return key != "secretName" and (bool(SECRET_WORDS & set(words)) or "access_key" in key.lower())


AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
INLINE_PASSWORD_URI = re.compile(r"://[^:/\s@]+:(?!\$\()[^@\s]+@")


def secret_problems(node: Any, where: str) -> Iterator[str]:
    if isinstance(node, dict):
        if node.get("kind") == "Secret" and (node.get("data") or node.get("stringData")):
            yield f"{where}: a Secret with its data written into the file"
        name = node.get("name")
        if isinstance(name, str) and "value" in node and SECRET_ENV.search(name) and name != "RAY_AUTH_MODE":
            yield f"{where}: env {name} has a literal value; use valueFrom.secretKeyRef"
        for key, value in node.items():
            if (
                isinstance(key, str)
                and secret_like(key)
                and isinstance(value, str | int)
                # a path as key (ray_cluster.yaml's file_mounts) says where a secret goes, not what it is
                and not key.startswith(("/", "~"))
            ):
                yield f"{where}: {key} has a literal value"
            yield from secret_problems(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from secret_problems(item, f"{where}[{index}]")


def test_no_secret_is_written_into_any_file() -> None:
    files = [
        *MANIFESTS,
        REPO / "infra" / "Dockerfile",
        REPO / "infra" / "README.md",
        REPO / "configs" / "cluster.yaml",
    ]
    for path in files:
        text = path.read_text()
        assert not AWS_KEY_ID.search(text), f"{path.name}: an AWS access key id"
        assert not re.search(r"aws_(secret_access_key|access_key_id|session_token)", text, re.IGNORECASE), (
            path.name
        )
        assert not INLINE_PASSWORD_URI.search(text), f"{path.name}: a password inside a URI"
        if path.suffix == ".yaml":
            problems = [p for doc in load_all(path) for p in secret_problems(doc, path.name)]
            assert problems == []
    # the secrets the manifests do need come from Secrets
    mlflow_text = (REPO / "infra" / "kubernetes" / "mlflow.yaml").read_text()
    assert "secretKeyRef" in mlflow_text and "--artifacts-destination" in mlflow_text
    # and the scanner catches what it should
    leaky = yaml.safe_load(
        "env: [{name: AWS_SECRET_ACCESS_KEY, value: abc}]\npassword: hunter2\nkind: Secret\ndata: {a: b}"
    )
    assert len(list(secret_problems(leaky, "leaky"))) == 3
    assert secret_like("aws_secret_access_key") and secret_like("dbPassword") and secret_like("auth-token")
    assert not secret_like("segment_tokens") and not secret_like("secretName")
    assert INLINE_PASSWORD_URI.search("postgresql://mlflow:hunter2@db:5432/mlflow")
    assert not INLINE_PASSWORD_URI.search("postgresql://$(DB_USER):$(DB_PASSWORD)@db:5432/mlflow")


def test_dockerfile_references_exist() -> None:
    text = (REPO / "infra" / "Dockerfile").read_text()
    instructions = [
        line.strip()
        for line in text.replace("\\\n", " ").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text)
    assert base and f":{version('ray')}-py311" in base.group(1), "base image must carry the pinned Ray"
    assert any(line.startswith("FROM ") for line in instructions)
    assert any("pip install" in line and " ." in line for line in instructions)
    workdir = [line.split()[1] for line in instructions if line.startswith("WORKDIR ")]
    assert workdir == [IMAGE_ROOT.rstrip("/")]
    copied = 0
    for line in instructions:
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            for source in parts[:-1]:  # the last one is the destination
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
                copied += 1
    assert copied >= 4
    ignore = (REPO / "infra" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore


@pytest.mark.parametrize("module", sorted(set(STAGES.values())))
def test_stage_modules_named_in_cli_exist(module: str) -> None:
    """Every stage the CLI dispatches to is a module with main() (strict, like the manifests)."""
    assert module_has_main(module), f"pipelines/{module}.py with a main() is missing"
