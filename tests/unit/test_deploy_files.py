"""The deployment files parse and say what an operator relies on.

Docker is not available where the tests run, so docker-compose.yml and the Dockerfile are
read as data and checked against the Compose specification and the repository layout.
"""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SERVICES = {"postgres", "redis", "mailpit", "migrate", "web", "worker", "beat"}
APP_SERVICES = {"migrate", "web", "worker", "beat"}
DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# Settings whose value must come from the operator's environment, never from this file.
SECRET_SETTINGS = {"NEWSLETTER_SECRET_KEY", "NEWSLETTER_ADMIN_TOKEN"}
INTERPOLATION = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?:(?::?[-?+]).*)?\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict)
    return services


def _argv(command: str | list[str]) -> list[str]:
    """A compose `command` (shell-style string or list) as an argument vector."""
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment` (mapping or list of KEY=VALUE) as a mapping."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {key: value for key, value in pairs}
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """`depends_on` (short list or long mapping) as {service: condition}."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _build_context(service: dict[str, Any]) -> str | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return build
    return str(build.get("context", "."))


# --- docker-compose.yml -------------------------------------------------------------------


def test_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose


def test_the_seven_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= SERVICES


def test_every_service_has_image_or_build(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name


def test_app_services_use_the_app_build(services: dict[str, dict[str, Any]]) -> None:
    web_image = services["web"].get("image")
    assert _build_context(services["web"]) in {".", "./"}
    for name in APP_SERVICES:
        service = services[name]
        assert _build_context(service) in {".", "./"}, name
        assert service.get("image") == web_image, name


def test_app_commands(services: dict[str, dict[str, Any]]) -> None:
    assert _argv(services["migrate"]["command"]) == ["newsletter", "init"]
    web = _argv(services["web"]["command"])
    assert web[:2] == ["newsletter", "serve"]
    assert web[web.index("--host") + 1] == "0.0.0.0"
    assert web[web.index("--port") + 1] == "8000"
    assert _argv(services["worker"]["command"])[:2] == ["newsletter", "worker"]
    beat = _argv(services["beat"]["command"])
    assert beat[0] == "celery" and "beat" in beat
    assert beat[beat.index("-A") + 1] == "worker.celery_app:app"


def test_web_publishes_port_8000(services: dict[str, dict[str, Any]]) -> None:
    ports = [str(port) for port in services["web"].get("ports", [])]
    assert any(port.split(":")[-2:] == ["8000", "8000"] for port in ports), ports


def test_migrate_runs_once(services: dict[str, dict[str, Any]]) -> None:
    # `restart: no` unquoted is the YAML boolean false, which Compose rejects.
    assert services["migrate"].get("restart") == "no"


def test_redis_persists_with_appendonly(services: dict[str, dict[str, Any]]) -> None:
    argv = _argv(services["redis"]["command"])
    assert argv[0] == "redis-server"
    assert "--appendonly" in argv, argv
    assert argv[argv.index("--appendonly") + 1] == "yes"
    targets = [str(volume).split(":")[1] for volume in services["redis"].get("volumes", [])]
    assert "/data" in targets


def test_depends_on_conditions_are_valid(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency, condition in _depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert dependency != name
            assert condition in DEPENDS_ON_CONDITIONS, f"{name}: {condition}"


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    assert _depends_on(services["migrate"])["postgres"] == "service_healthy"
    web = _depends_on(services["web"])
    assert web["migrate"] == "service_completed_successfully"
    assert web["redis"] == "service_healthy"
    # A dependency on service_healthy needs a healthcheck on that service.
    for name, service in services.items():
        for dependency, condition in _depends_on(service).items():
            if condition == "service_healthy":
                check = services[dependency].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (name, dependency)


def test_app_environment(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        env = _environment(services[name])
        assert env["NEWSLETTER_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["NEWSLETTER_DATABASE_URL"], name
        assert env["NEWSLETTER_BROKER_URL"] == "redis://redis:6379/0", name
        assert env["NEWSLETTER_SMTP_URL"] == "smtp://mailpit:1025", name
        assert env["NEWSLETTER_ENV"] == "production", name


def test_no_literal_secrets(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        env = _environment(service)
        for key in SECRET_SETTINGS & env.keys():
            assert INTERPOLATION.match(env[key]), f"{name}: {key} is not taken from ${{...}}"
        for key, value in env.items():
            if any(word in key for word in ("SECRET", "TOKEN", "API_KEY")):
                assert INTERPOLATION.match(value), f"{name}: {key} has a literal value"
    secret_key = _environment(services["web"])["NEWSLETTER_SECRET_KEY"]
    # `:?` makes Compose refuse to start with the key unset or empty.
    assert secret_key.startswith("${NEWSLETTER_SECRET_KEY:?"), secret_key


def test_named_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                source = volume.get("source") if volume.get("type", "volume") == "volume" else None
            else:
                source = str(volume).split(":")[0] if ":" in str(volume) else None
            if not source or source.startswith((".", "/", "~", "$")):
                continue  # anonymous volume or bind mount
            assert source in declared, f"{name} uses undeclared volume {source}"


def test_database_and_broker_data_live_in_named_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    for name, target in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        mounts = {
            str(volume).split(":")[1]: str(volume).split(":")[0]
            for volume in services[name].get("volumes", [])
        }
        assert mounts.get(target) in declared, (name, mounts)


# --- Dockerfile ---------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return instructions


def _arguments(rest: str) -> list[str]:
    """Exec form (JSON array) or shell form, as a list; leading --flags dropped."""
    if rest.startswith("["):
        value = json.loads(rest)
        assert isinstance(value, list)
        return [str(part) for part in value]
    return [part for part in shlex.split(rest) if not part.startswith("--")]


def test_dockerfile_base_image() -> None:
    froms = [rest for keyword, rest in _instructions() if keyword == "FROM"]
    assert froms and froms[0].split()[0] == "python:3.11-slim"


def test_dockerfile_runs_as_non_root() -> None:
    users = [rest for keyword, rest in _instructions() if keyword == "USER"]
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_dockerfile_cmd_serves_the_web_app() -> None:
    instructions = _instructions()
    cmds = [rest for keyword, rest in instructions if keyword == "CMD"]
    assert cmds
    argv = _arguments(cmds[-1])
    assert argv[:2] == ["newsletter", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert ("EXPOSE", "8000") in instructions
    workdirs = [rest for keyword, rest in instructions if keyword == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app"


def test_dockerfile_installs_the_package() -> None:
    runs = [rest for keyword, rest in _instructions() if keyword == "RUN"]
    assert any("pip install --no-cache-dir ." in run for run in runs)


def test_dockerfile_healthcheck_hits_healthz() -> None:
    checks = [rest for keyword, rest in _instructions() if keyword == "HEALTHCHECK"]
    assert checks
    assert "urllib" in checks[-1] and "http://127.0.0.1:8000/healthz" in checks[-1]


def test_dockerfile_copy_sources_exist() -> None:
    copies = [rest for keyword, rest in _instructions() if keyword in {"COPY", "ADD"}]
    assert copies
    copied: set[str] = set()
    for rest in copies:
        parts = _arguments(rest)
        sources, _destination = parts[:-1], parts[-1]
        assert sources, rest
        matched = 0
        for source in sources:
            if glob.has_magic(source):
                # Docker allows a wildcard that matches nothing if another source matches.
                hits = glob.glob(source, root_dir=ROOT)
                matched += len(hits)
            else:
                assert (ROOT / source).exists(), f"COPY source {source} is missing"
                matched += 1
            copied.add(source.rstrip("/"))
        assert matched, f"COPY {rest} copies nothing"
    assert {"pyproject.toml", "newsletter", "worker", "templates"} <= copied


def test_dockerignore_keeps_copied_sources_in_the_context() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "tests", "benchmarks"} <= ignored
    assert not ignored & {"pyproject.toml", "newsletter", "worker", "templates"}


# Settings that production refuses to start on their defaults (newsletter/production.py):
# Compose must refuse to start until the operator sets them.
REQUIRED_SETTINGS = {
    "NEWSLETTER_SECRET_KEY",
    "NEWSLETTER_BASE_URL",
    "NEWSLETTER_POSTAL_ADDRESS",
    "NEWSLETTER_DKIM_DOMAIN",
    "NEWSLETTER_DKIM_SELECTOR",
}


def test_production_settings_are_required_not_defaulted(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    for name in APP_SERVICES:
        env = _environment(services[name])
        for key in REQUIRED_SETTINGS:
            value = env.get(key, "")
            assert value.startswith(f"${{{key}:?"), f"{name}: {key} is {value!r}"
            assert len(value) > len(key) + 6, f"{name}: {key} has no message"
        assert env["NEWSLETTER_DKIM_KEY_FILE"] == "/run/secrets/dkim_key", name
        assert "dkim_key" in services[name].get("secrets", []), name
    key_file = compose["secrets"]["dkim_key"]["file"]
    assert key_file.startswith("${NEWSLETTER_DKIM_KEY_PATH:?"), key_file
