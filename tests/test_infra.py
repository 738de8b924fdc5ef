"""Deployment files: they parse, run real entrypoints, schedule validly and hold no secret."""

from __future__ import annotations

import base64
import configparser
import copy
import functools
import importlib.util
import json
import os
import re
import secrets
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipelines.cli import STAGES
from tests.conftest import BIN, free_port, wait_for_http

REPO = Path(__file__).resolve().parent.parent
IMAGE_ROOT = "/app/"  # WORKDIR of infra/Dockerfile: the repo's files live here in the image
MANIFESTS = sorted((REPO / "infra").rglob("*.yaml")) + [REPO / "ray_cluster.yaml"]
JOB_STAGES = [stage for stage in STAGES if stage not in ("demo-corpus", "show")]  # local-only


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
    # A regex, not `ast.parse`: see tests/imports_of.py for the CPython 3.11.7 thread bug.
    return re.search(r"^def main\(", path.read_text(), re.MULTILINE) is not None


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


# --- Pod security ---------------------------------------------------------------------------

IMAGE_USER = re.compile(r"^USER (\d+):(\d+)$", re.MULTILINE)


def pod_specs(node: Any) -> Iterator[dict]:
    """Every pod spec in a manifest, whatever the kind nests it under (a dict with containers)."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for value in node.values():
            yield from pod_specs(value)
    elif isinstance(node, list):
        for item in node:
            yield from pod_specs(item)


def security_problems(pod: dict, where: str) -> Iterator[str]:
    """What breaks the rule: non-root, no privilege escalation, no capabilities."""
    pod_context = pod.get("securityContext") or {}
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        name = f"{where}:{container['name']}"
        context = {**pod_context, **(container.get("securityContext") or {})}
        if context.get("runAsNonRoot") is not True:
            yield f"{name}: runAsNonRoot is not true"
        if not context.get("runAsUser"):
            yield f"{name}: no runAsUser (or 0)"
        if context.get("allowPrivilegeEscalation") is not False:
            yield f"{name}: allowPrivilegeEscalation is not false"
        if context.get("privileged"):
            yield f"{name}: privileged"
        if "ALL" not in (context.get("capabilities") or {}).get("drop", []):
            yield f"{name}: capabilities not dropped (drop: [ALL])"
        if (context.get("capabilities") or {}).get("add"):
            yield f"{name}: adds capabilities"


def test_every_pod_runs_non_root_without_privileges() -> None:
    image_user = IMAGE_USER.findall((REPO / "infra" / "Dockerfile").read_text())
    assert len(image_user) == 1, "the Dockerfile sets its user once, by number (USER uid:gid)"
    uid, gid = (int(n) for n in image_user[0])
    assert uid != 0
    for path in MANIFESTS:
        if path.name == "ray_cluster.yaml":
            continue
        for doc in load_all(path):
            where = f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"
            pods = list(pod_specs(doc))
            if doc["kind"] in ("Deployment", "StatefulSet", "CronJob", "RayJob", "RayCronJob"):
                assert len(pods) == 1, where
            if doc["kind"] == "RayCluster":
                assert len(pods) == 1 + len(doc["spec"]["workerGroupSpecs"]), where
                # KubeRay adds the autoscaler sidecar to the head pod with this securityContext
                head = doc["spec"]["headGroupSpec"]["template"]["spec"]
                sidecar = {
                    "name": "autoscaler",
                    "securityContext": doc["spec"]["autoscalerOptions"].get("securityContext"),
                }
                pods.append({**head, "containers": [sidecar]})
            for pod in pods:
                assert list(security_problems(pod, where)) == []
                if any("videobert:" in container.get("image", "") for container in pod["containers"]):
                    context = pod.get("securityContext") or {}
                    assert (context.get("runAsUser"), context.get("runAsGroup")) == (uid, gid), (
                        f"{where}: the pipeline image runs as its own user {uid}:{gid}"
                    )
    # the check itself catches a bare pod and a root one
    assert len(list(security_problems({"containers": [{"name": "c"}]}, "bare"))) == 4
    root = {"securityContext": {"runAsNonRoot": True, "runAsUser": 0}, "containers": [{"name": "c"}]}
    assert "root:c: no runAsUser (or 0)" in security_problems(root, "root")


# --- The MLflow server, started the way infra/kubernetes/mlflow.yaml starts it -------------

MLFLOW_MANIFEST = REPO / "infra" / "kubernetes" / "mlflow.yaml"
K8S_VAR = re.compile(r"\$\((\w+)\)")


def find_object(path: Path, kind: str, name: str) -> dict:
    (found,) = [doc for doc in load_all(path) if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def container_env(container: dict, secret: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: Secret values, then $(VAR) expansion."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = K8S_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret[(ref["name"], ref["key"])]
    return env


def with_option(argv: list[str], option: str, value: str) -> list[str]:
    """`argv` with the value after `option` replaced (the option must be there)."""
    assert option in argv, f"{option} missing from {argv}"
    index = argv.index(option) + 1
    return [*argv[:index], value, *argv[index + 1 :]]


def http_status(url: str, host: str, user: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    request.add_header("Host", host)  # what a client in the cluster sends
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(user).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@dataclass
class ManifestMlflow:
    url: str  # where it listens here
    env: dict[str, str]  # the server's environment, as the pod would have it (store made local)


@pytest.fixture
def manifest_mlflow(tmp_path: Path) -> Iterator[ManifestMlflow]:
    """The MLflow Deployment's init containers and server, run here as the manifest runs them.

    Only what is local changes: the store (SQLite instead of PostgreSQL), the artifact
    destination, the bind address and port, and the pod's volumes (a temp directory each).
    Every Secret key gets a random value.
    """
    pod = find_object(MLFLOW_MANIFEST, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    argv = [*server["command"], *server.get("args", [])]
    if "basic-auth" in argv and importlib.util.find_spec("flask_wtf") is None:
        pytest.skip("MLflow's basic-auth app needs mlflow[auth] (Flask-WTF) in this environment")
    volumes = {volume["name"]: tmp_path / volume["name"] for volume in pod.get("volumes", [])}
    secret: dict[tuple[str, str], str] = defaultdict(lambda: secrets.token_hex(24))
    port = free_port()
    argv = with_option(argv, "--host", "127.0.0.1")
    argv = with_option(argv, "--port", str(port))
    argv = with_option(argv, "--artifacts-destination", str(tmp_path / "artifacts"))
    if (BIN / argv[0]).exists():
        argv[0] = str(BIN / argv[0])  # this environment's mlflow, not one on PATH

    def local_env(container: dict) -> dict[str, str]:
        env = container_env(container, secret)
        assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
        env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
        for mount in container.get("volumeMounts", []):
            volumes[mount["name"]].mkdir(exist_ok=True)
            for name, value in env.items():
                if value.startswith(mount["mountPath"] + "/"):
                    env[name] = str(volumes[mount["name"]]) + value[len(mount["mountPath"]) :]
        # none of this machine's MLflow settings (e.g. MLFLOW_SERVER_ALLOWED_HOSTS) leaks in
        base = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
        return {**base, **env}

    for init in pod.get("initContainers", []):
        subprocess.run([*init["command"], *init.get("args", [])], env=local_env(init), check=True, timeout=60)
    env = local_env(server)
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115 - closed with the process
        start_new_session=True,  # so that its workers stop with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # ~15 s of CPU (the CLI, then two workers importing MLflow): slow on a busy machine
        wait_for_http(f"{url}/health", timeout=300)
        assert process.poll() is None, log.read_text()[-3000:]
        yield ManifestMlflow(url=url, env=env)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


MLFLOW_CLIENT_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def ray_env(name: str) -> dict:
    """One env entry of the Ray head container (every Ray pod gets the same list)."""
    cluster = find_object(REPO / "infra" / "kuberay" / "raycluster.yaml", "RayCluster", "videobert")
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    (entry,) = [item for item in head["env"] if item["name"] == name]
    return entry


def in_cluster_hosts() -> set[str]:
    """The Host headers MLflow gets in the cluster: the Ray pods' MLFLOW_TRACKING_URI and every
    DNS name of the Service, with its port."""
    hosts = {urllib.parse.urlsplit(ray_env("MLFLOW_TRACKING_URI")["value"]).netloc}
    service = find_object(MLFLOW_MANIFEST, "Service", "mlflow")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    (port,) = [entry["port"] for entry in service["spec"]["ports"]]
    for dns in (
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.cluster.local",
    ):
        hosts.add(f"{dns}:{port}")
    return hosts


def test_mlflow_server_answers_the_cluster_and_refuses_other_hosts(manifest_mlflow: ManifestMlflow) -> None:
    """MLflow 3 answers 403 to a Host header it does not allow: the cluster's names must pass,
    every API call must need a user, and a user must get through."""
    api = f"{manifest_mlflow.url}/api/2.0/mlflow/experiments/search?max_results=1"
    hosts = in_cluster_hosts()
    assert "mlflow.videobert.svc.cluster.local:5000" in hosts
    for host in sorted(hosts):
        # 401, not 403: the Host check let it through, and basic auth asks for a user
        status = http_status(api, host)
        assert status != 403, f"Host {host} refused: --allowed-hosts must list the in-cluster names"
        assert status == 401, f"Host {host}: an API call without a user got {status}"
    auth = configparser.ConfigParser()
    auth.read(manifest_mlflow.env["MLFLOW_AUTH_CONFIG_PATH"])  # as the init container wrote it
    admin = (
        manifest_mlflow.env.get("MLFLOW_AUTH_ADMIN_USERNAME") or auth["mlflow"]["admin_username"],
        manifest_mlflow.env["MLFLOW_AUTH_ADMIN_PASSWORD"],
    )
    ray_host = urllib.parse.urlsplit(ray_env("MLFLOW_TRACKING_URI")["value"]).netloc
    assert http_status(api, ray_host, admin) == 200
    # the Ray pods are a user too, with the credentials from a Secret
    assert all("secretKeyRef" in ray_env(name).get("valueFrom", {}) for name in MLFLOW_CLIENT_ENV)
    # A name nobody listed (DNS rebinding, a stray ingress) is refused, with a user or without.
    assert http_status(api, "evil.example.com:5000", admin) == 403
    assert http_status(api, "mlflow.other-namespace.svc.cluster.local:5000") == 403
    # /health is exempt from both: the readiness probe (Host: the pod's IP) passes regardless.
    assert http_status(f"{manifest_mlflow.url}/health", "10.1.2.3:5000") == 200


# --- Schemas: KubeRay's CRDs and Ray's cluster-launcher schema ------------------------------

KUBERAY_SCHEMAS = REPO / "tests" / "schemas" / "kuberay"  # vendored; see the README there
KUBERAY_KINDS = {"RayCluster": "raycluster", "RayJob": "rayjob", "RayCronJob": "raycronjob"}


def strict(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields, as `kubectl apply` (strict field validation)
    does; the API server would otherwise drop them without a word."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@functools.cache
def kuberay_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((KUBERAY_SCHEMAS / f"{KUBERAY_KINDS[kind]}.json").read_text())
    return jsonschema.Draft7Validator(strict(schema))


def schema_errors(doc: dict) -> list[str]:
    errors = kuberay_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message[:200]}" for error in errors]


def test_kuberay_manifests_match_the_kuberay_crds() -> None:
    seen = set()
    for path in sorted((REPO / "infra" / "kuberay").glob("*.yaml")):
        for doc in load_all(path):
            if doc["apiVersion"].startswith("ray.io/"):
                assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in KUBERAY_KINDS, path.name
                assert schema_errors(doc) == [], path.name
                seen.add(doc["kind"])
    assert seen == set(KUBERAY_KINDS)
    # the strict schemas catch what the API server would drop or refuse
    (cron,) = load_all(REPO / "infra" / "kuberay" / "raycronjob-run.yaml")
    assert schema_errors({**cron, "spec": {**cron["spec"], "concurrencyPolicy": "Forbid"}})
    (job,) = load_all(REPO / "infra" / "kuberay" / "rayjob-run.yaml")
    assert schema_errors({**job, "spec": {**job["spec"], "entryPoint": "python x.py"}})
    assert schema_errors({**job, "spec": {**job["spec"], "shutdownAfterJobFinishes": "no"}})


def test_ray_cluster_yaml_matches_rays_schema() -> None:
    """What `ray up` checks before it starts anything: Ray's defaults filled in, then its
    schema (ray/autoscaler/ray-schema.json) and its own consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_all(REPO / "ray_cluster.yaml")[0]
    validate_config(prepare_config(copy.deepcopy(config)))
    with pytest.raises(jsonschema.ValidationError):  # the schema does reject an unknown key
        validate_config(prepare_config({**copy.deepcopy(config), "head_setup_command": []}))


# --- Network exposure --------------------------------------------------------------------------

WORLD = ("0.0.0.0/0", "::/0")


def test_ray_up_opens_nothing_to_the_world(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without SecurityGroupIds `ray up` makes its own group with SSH open to 0.0.0.0/0 (and
    `provider.security_group` only adds rules to it): every node type must name a group."""
    from ray.autoscaler._private.aws import config as aws_config

    config = load_all(REPO / "ray_cluster.yaml")[0]
    for name, node in config["available_node_types"].items():
        assert node["node_config"].get("SecurityGroupIds"), f"{name}: no SecurityGroupIds"
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        assert not set(ranges) & set(WORLD), rule

    # Ray's own step: with a group named for every node type it creates and changes nothing
    def no_aws(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("ray up would create or change a security group")

    monkeypatch.setattr(aws_config, "_resource", no_aws)
    monkeypatch.setattr(aws_config, "_client", no_aws)
    configured = aws_config._configure_security_group(copy.deepcopy(config))
    assert configured["available_node_types"] == config["available_node_types"]
    # and the group Ray would otherwise make is the one that opens SSH to the world
    assert aws_config._create_default_ssh_inbound_rules()[0]["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}]
    # the group's rules, as infra/README.md makes them, admit no one from outside
    readme = (REPO / "infra" / "README.md").read_text().replace("\\\n", " ")
    rules = [line for line in readme.splitlines() if "authorize-security-group-ingress" in line]
    assert rules and not [rule for rule in rules if any(cidr in rule for cidr in WORLD)]


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector.get("matchLabels")) and selector["matchLabels"].items() <= labels.items()


def test_only_the_ray_pods_reach_mlflow_and_only_mlflow_reaches_its_database() -> None:
    docs = load_all(MLFLOW_MANIFEST)
    policies = [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
    cluster = find_object(REPO / "infra" / "kuberay" / "raycluster.yaml", "RayCluster", "videobert")
    ray_pod_labels = {"ray.io/cluster": cluster["metadata"]["name"]}  # KubeRay sets it on every pod
    mlflow_labels = find_object(MLFLOW_MANIFEST, "Deployment", "mlflow")["spec"]["template"]["metadata"][
        "labels"
    ]
    allowed = {"mlflow": ray_pod_labels, "mlflow-postgres": mlflow_labels}
    for workload in [doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")]:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        mine = [policy for policy in policies if labels_match(policy["spec"]["podSelector"], labels)]
        assert mine, f"{workload['metadata']['name']}: no NetworkPolicy selects its pods"
        for policy in mine:
            assert "Ingress" in policy["spec"]["policyTypes"]
            for rule in policy["spec"].get("ingress", []):
                # a rule without `from` admits every source
                assert rule.get("from"), f"{policy['metadata']['name']}: ingress from anywhere"
                for source in rule["from"]:
                    assert set(source) == {"podSelector"}, source  # no namespace or IP block
                    assert labels_match(source["podSelector"], allowed[workload["metadata"]["name"]])


# --- Scheduled runs never overlap ------------------------------------------------------------


def test_scheduled_runs_never_overlap() -> None:
    """`concurrencyPolicy: Forbid` where the kind has one; where it has none (RayCronJob, by its
    CRD) the pipeline's lease under `output` is the guard, and the deployment guide says so."""
    cron_spec = json.loads((KUBERAY_SCHEMAS / "raycronjob.json").read_text())["properties"]["spec"]
    assert "concurrencyPolicy" not in cron_spec["properties"], "RayCronJob has one now: set it to Forbid"
    paragraphs = (REPO / "infra" / "README.md").read_text().split("\n\n")
    for path in MANIFESTS:
        for doc in load_all(path):
            if isinstance(doc, dict) and doc.get("kind") == "CronJob":
                assert doc["spec"]["concurrencyPolicy"] == "Forbid", path.name
            if isinstance(doc, dict) and doc.get("kind") == "RayCronJob":
                assert "concurrencyPolicy" not in doc["spec"]
                assert any("RayCronJob" in part and "lease" in part for part in paragraphs), (
                    "infra/README.md must say that the lease guards the RayCronJob"
                )
