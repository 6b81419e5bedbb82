"""docker/: the images' and the compose file's structure (no Docker engine on the build machines)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / dockerfile).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_are_multi_stage_pinned_non_root_and_healthchecked(dockerfile):
    steps = instructions(dockerfile)
    stages = [args for word, args in steps if word == "FROM"]
    assert len(stages) >= 2, stages  # build and runtime
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"])  # no floating tag
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    runs = " ".join(a for w, a in steps if w == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and "-c docker/constraints.txt ." in runs
    # the runtime stage: the last USER is not root, and a HEALTHCHECK is declared
    runtime = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert any(w == "HEALTHCHECK" and "CMD" in a for w, a in runtime)
    assert (DOCKER / f"{dockerfile}.dockerignore").read_text().lstrip().startswith("#")
    assert "!botaclip_core/" in (DOCKER / f"{dockerfile}.dockerignore").read_text()


def test_constraints_pin_every_package_to_one_version():
    lines = [
        line
        for line in (DOCKER / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+!]+", line) for line in lines), lines
    names = {line.split("==")[0].lower() for line in lines}
    assert {"prefect", "dask", "distributed", "rasterio", "zarr", "asyncpg", "bokeh"} <= names


def test_compose_services_healthchecks_gpu_and_volumes():
    spec = compose()
    services = spec["services"]
    assert {
        "postgres",
        "prefect-server",
        "botaclip-worker",
        "dask-scheduler",
        "dask-worker",
        "dask-gpu-worker",
    } <= set(services)
    for name, service in services.items():
        assert "healthcheck" in service, name
    server = services["prefect-server"]
    assert server["command"][:2] == ["botaclip", "server"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    worker = services["botaclip-worker"]
    assert worker["command"][:2] == ["botaclip", "deploy"] and "--dask-address" in worker["command"]
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    gpu = services["dask-gpu-worker"]
    command = gpu["command"]
    assert command[command.index("--resources") + 1] == "GPU=1"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    cpu = services["dask-worker"]
    assert "--resources" not in cpu["command"] and cpu["command"][:2] == ["dask", "worker"]
    assert {"prefect-db", "botaclip-work"} <= set(spec["volumes"])
    assert "botaclip-work:/data/work" in cpu["volumes"]
    assert "prefect-db:/var/lib/postgresql/data" in services["postgres"]["volumes"]


def test_no_port_on_every_interface_and_no_literal_password():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        for key, value in (service.get("environment") or {}).items():
            text = str(value)
            if "PASSWORD" in key:
                assert text.startswith("${") and text.endswith("}"), (name, key, text)
            # a URL's password comes from the environment too
            resolved = re.sub(r"\$\{[^}]*\}", "VAR", text)
            for secret in re.findall(r"://[^:/@]+:([^@]+)@", resolved):
                assert secret == "VAR", (name, key, text)
    example = (DOCKER / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", example, re.M)  # to be filled in, never shipped
    for dockerfile in DOCKERFILES:
        assert "PASSWORD" not in (DOCKER / dockerfile).read_text()


def test_prefect_yaml_deploys_the_same_flows_to_a_work_pool():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {
        "botaclip-demo",
        "botaclip-demo-regenerate-embeddings",
        "botaclip-demo-refit-downstream",
    }
    for d in deployments.values():
        path, _, flow = d["entrypoint"].partition(":")
        assert (REPO / path).is_file() and f"def {flow}(" in (REPO / path).read_text()
        assert d["work_pool"]["name"] == "botaclip"
        assert set(d["parameters"]["params"]) >= {"catalog", "region"}
    assert deployments["botaclip-demo"]["schedules"] == [
        {"cron": "0 3 1 * *", "timezone": "Europe/Paris"}
    ]


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    return [docker, "compose"] if probe.returncode == 0 else None


def test_docker_compose_config_accepts_the_file(tmp_path):
    command = _docker_compose()
    if command is None:
        pytest.skip("no Docker CLI with the compose plugin here")
    env_file = tmp_path / ".env"
    env_file.write_text(
        (DOCKER / ".env.example").read_text().replace("POSTGRES_PASSWORD=", "POSTGRES_PASSWORD=x")
    )
    args = ["-f", str(DOCKER / "compose.yaml"), "--env-file", str(env_file)]
    done = subprocess.run(
        [*command, *args, "--profile", "gpu", "config", "--quiet"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    missing = subprocess.run(
        [
            *command,
            "-f",
            str(DOCKER / "compose.yaml"),
            "--env-file",
            str(empty),
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        cwd=tmp_path,
    )
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr
