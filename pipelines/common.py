"""What every stage entrypoint shares: argument parsing, exit codes, Ray start-up."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from videobert import storage
from videobert.config import ConfigError, ExperimentConfig, check_uri, load_config
from videobert.lease import LeaseHeldError, hold_lease
from videobert.results import MissingInputError
from videobert.storage import StorageError

log = logging.getLogger("videobert")

EXIT_OK = 0
EXIT_CONFIG = 2  # the config or an override cannot be used (the message names the key)
EXIT_STORAGE = 3  # storage unreachable or failing (S3 endpoint, credentials, permissions)
EXIT_MISSING_INPUT = 4  # an upstream stage's output is missing (the message names the stage)
EXIT_BUSY = 5  # another run holds the lease on `output` (the message names it; see videobert/lease.py)

# Variables a worker on another node needs to reach the same services. Credentials are
# deliberately absent: on a cluster they come from the node's instance profile / env. A runtime
# env is recorded by Ray (GCS, dashboard, logs), so nothing secret may travel in one. The
# MLflow tracking URI is not here either: workers get it as an argument of their task.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "TORCH_EXTENSIONS_DIR",
    "HF_HUB_OFFLINE",
    "TORCH_HOME",
)


def parse_args(stage: str, argv: list[str] | None) -> ExperimentConfig:
    parser = argparse.ArgumentParser(
        prog=f"videobert {stage}", description=f"Run the {stage} stage of the VideoBERT pipeline."
    )
    parser.add_argument("--config", help="experiment YAML (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted key, e.g. --set decode.fps=10 (repeatable)",
    )
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def stage_main(
    stage: str, run: Callable[[ExperimentConfig], Any], argv: list[str] | None = None, lease: bool = True
) -> int:
    """Parse arguments, run the stage while holding the lease on `output` (unless `lease` is
    off, for stages that write elsewhere), and map failures to clear messages and exit codes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = parse_args(stage, argv)
        if lease:
            storage.check_reachable(config.output, config.s3, create=True)
            with hold_lease(config.output, stage, config.lease, config.s3):
                run(config)
        else:
            run(config)
    except ConfigError as error:
        print(f"videobert {stage}: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except (StorageError, OSError) as error:  # OSError: a full disk, a read-only mount, ...
        print(f"videobert {stage}: storage error: {error}", file=sys.stderr)
        return EXIT_STORAGE
    except MissingInputError as error:
        print(f"videobert {stage}: missing input: {error}", file=sys.stderr)
        return EXIT_MISSING_INPUT
    except LeaseHeldError as error:
        print(f"videobert {stage}: busy: {error}", file=sys.stderr)
        return EXIT_BUSY
    return EXIT_OK


_private_api_address: str | None = None
"""The RAY_API_SERVER_ADDRESS init_ray set for the private instance it started last."""


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`; `auto` finds a local
    `ray start` cluster), else start a private local instance.

    A local instance gets at least 4 logical CPUs: CPU training workers hold one each, and
    with only the 2 physical cores as slots, Ray Data's read tasks feeding them would never
    be scheduled (a deadlock seen on this 2-core machine). The cores are shared, not lost.
    """
    import ray

    global _private_api_address
    if ray.is_initialized():
        return
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    for name, value in env_vars.items():  # e.g. AWS_ENDPOINT_URL=http://key:secret@host
        check_uri(f"environment variable {name}", value)
    runtime_env = {"env_vars": env_vars} if env_vars else None
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    # A private instance's workers (which inherit this environment) must find its own state
    # API. Otherwise they look up the last `ray start` cluster on this machine: Ray Train's
    # placement-group watcher then waits on a dead or foreign cluster, and every Ray Train run
    # ended about 14 s late (22 s vs 38 s for an empty run, with a stale cluster file here).
    # A value a user set wins; ours is renewed when this process starts another instance.
    dashboard_port = None
    if os.environ.get("RAY_API_SERVER_ADDRESS") in (None, _private_api_address):
        dashboard_port = free_local_port()
        _private_api_address = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        runtime_env=runtime_env,
        log_to_driver=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
    )


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
