"""``docker-compose.yml``, ``Dockerfile`` and ``.dockerignore`` agree with the code: the
commands exist in ``core.cli``, every ``UWS_*`` variable is a setting, the search attributes
are those of ``core.temporal``, the health check hits a route the app serves.

Nothing is built or started; the compose checks need PyYAML and are skipped without it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from packaging.specifiers import SpecifierSet

from app import cli
from core.settings import Settings
from core.temporal import SEARCH_ATTRIBUTES

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OUR_SERVICES = {"api": "api", "worker": "worker", "migrate": "migrate"}  # service -> command
NEEDED_EVERYWHERE = {"UWS_CONFIG", "UWS_DATABASE_URL", "UWS_TEMPORAL_ADDRESS",
                     "UWS_TEMPORAL_NAMESPACE", "UWS_TASK_QUEUE", "UWS_DATA_DIR"}
# Custom search attribute slots per namespace of Temporal's SQL visibility store
# (schema/postgresql/v12/visibility: Int01-03, Keyword01-10, ...).
SQL_VISIBILITY_SLOTS = {"Bool": 3, "Datetime": 3, "Double": 3, "Int": 3, "Keyword": 10,
                        "Text": 3, "KeywordList": 3}


# --- helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    return compose["services"][name]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _script(service: dict[str, Any]) -> str:
    return "\n".join(_argv(service.get("entrypoint")) + _argv(service.get("command")))


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's volumes, short or long syntax."""
    mounts = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source, target = vol.split(":")[:2]
        else:
            source, target = vol.get("source", ""), vol["target"]
        mounts[target] = source
    return mounts


def _cli_subcommands() -> set[str]:
    """The subcommands of the parser ``app.cli.main`` builds, taken as it parses."""

    class Captured(Exception):
        pass

    parsers: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        parsers.append(self)
        raise Captured

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(Captured):
            cli.main([])
    actions = [a for a in parsers[0]._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return set(actions[0].choices)


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per build stage, continuation lines joined."""
    stages: list[list[tuple[str, str]]] = []
    buf = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        instr, _, args = (buf + line).partition(" ")
        buf = ""
        if instr.upper() == "FROM":
            stages.append([])
        stages[-1].append((instr.upper(), args.strip()))
    return stages


def _instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instr, args in stage if instr == name]


def _docker_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for args in _instructions(stage, "ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def _setting_name(var: str) -> str:
    prefix = Settings.model_config["env_prefix"]
    assert var.startswith(prefix)
    return var.removeprefix(prefix).lower()


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative, with /) is left out of the build context. Close to
    Docker's rules: a pattern excludes what it matches and everything below; ``!``
    re-includes; the last matching pattern wins. fnmatch's ``*`` also crosses ``/``,
    so this errs on the side of "ignored"."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        for prefix in prefixes:
            if pattern.startswith("**/"):
                segs = prefix.split("/")
                hit = any(fnmatch.fnmatchcase("/".join(segs[i:]), pattern[3:])
                          for i in range(len(segs)))
            else:
                hit = fnmatch.fnmatchcase(prefix, pattern)
            if hit:
                ignored = not negate
                break
    return ignored


# --- compose ----------------------------------------------------------------------------


def test_services_exist(compose: dict[str, Any]) -> None:
    assert {"postgresql", "temporal", "temporal-setup", "temporal-ui", "migrate", "api",
            "worker", "nginx"} <= set(compose["services"])


def test_our_services_run_the_image_of_the_dockerfile(compose: dict[str, Any]) -> None:
    images = set()
    for name in OUR_SERVICES:
        service = _service(compose, name)
        build = service["build"]
        build = {"context": build} if isinstance(build, str) else build
        assert (ROOT / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() \
            == ROOT / "Dockerfile", name
        images.add(service["image"])
    assert len(images) == 1, images


def test_commands_are_uws_subcommands(compose: dict[str, Any]) -> None:
    subcommands = _cli_subcommands()
    assert {"api", "worker", "migrate", "dev", "create-client-token"} <= subcommands
    for name, command in OUR_SERVICES.items():
        argv = _argv(_service(compose, name)["command"])
        assert argv[0] == command and argv[0] in subcommands, name


def test_uws_variables_are_settings(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    for name, service in compose["services"].items():
        uws = {k: v for k, v in _env(service).items() if k.startswith("UWS_")}
        for var in uws:
            assert _setting_name(var) in fields, f"{name}: {var} is not a setting"
        # And the values have the types the settings want.
        Settings(**{_setting_name(k): v for k, v in uws.items()})


def test_our_services_share_the_wiring(compose: dict[str, Any]) -> None:
    envs = {name: _env(_service(compose, name)) for name in OUR_SERVICES}
    for name, env in envs.items():
        assert NEEDED_EVERYWHERE <= set(env), f"{name} lacks {NEEDED_EVERYWHERE - set(env)}"
    for var in NEEDED_EVERYWHERE:
        assert len({env[var] for env in envs.values()}) == 1, f"{var} differs"


def test_api_listens_where_the_proxy_and_the_dockerfile_expect(
        compose: dict[str, Any]) -> None:
    env = _env(_service(compose, "api"))
    assert env["UWS_HOST"] == "0.0.0.0"
    port = int(env["UWS_PORT"])
    runtime = _dockerfile_stages()[-1]
    assert int(_instructions(runtime, "EXPOSE")[0]) == port
    nginx = compose["configs"]["nginx-uws"]["content"]
    assert f"http://api:{port}" in nginx


def test_api_replicas_behind_nginx(compose: dict[str, Any]) -> None:
    api = _service(compose, "api")
    assert api["deploy"]["replicas"] >= 2
    assert "ports" not in api  # one host port cannot take two replicas
    nginx = _service(compose, "nginx")
    assert [c["source"] for c in nginx["configs"]] == ["nginx-uws"]
    conf = compose["configs"]["nginx-uws"]["content"]
    # WebSockets (live job status) need HTTP/1.1 and the upgrade headers passed on.
    assert "proxy_http_version 1.1;" in conf
    assert "proxy_set_header Upgrade $$http_upgrade;" in conf
    assert "proxy_set_header Connection $$connection_upgrade;" in conf


def test_services_point_at_the_compose_postgresql_and_temporal(
        compose: dict[str, Any]) -> None:
    env = _env(_service(compose, "api"))
    dsn = urlsplit(env["UWS_DATABASE_URL"])
    postgres = _env(_service(compose, "postgresql"))
    assert dsn.scheme in ("postgresql", "postgres")
    assert dsn.hostname == "postgresql" and dsn.port == 5432
    assert dsn.username == postgres["POSTGRES_USER"]
    assert dsn.path == f"/{postgres['POSTGRES_DB']}"
    host, _, port = env["UWS_TEMPORAL_ADDRESS"].partition(":")
    assert host == "temporal" and port == "7233"
    assert _service(compose, "temporal")["image"].startswith("temporalio/auto-setup:")
    assert _env(_service(compose, "temporal-setup"))["TEMPORAL_ADDRESS"] == "temporal:7233"


def test_database_password_comes_from_the_environment(compose: dict[str, Any]) -> None:
    secret = "${POSTGRES_PASSWORD:-uws}"
    assert _env(_service(compose, "postgresql"))["POSTGRES_PASSWORD"] == secret
    assert _env(_service(compose, "temporal"))["POSTGRES_PWD"] == secret
    for name in OUR_SERVICES:
        assert urlsplit(_env(_service(compose, name))["UWS_DATABASE_URL"]).password == secret


def test_one_namespace_everywhere(compose: dict[str, Any]) -> None:
    namespaces = {
        _env(_service(compose, "temporal"))["DEFAULT_NAMESPACE"],
        _env(_service(compose, "temporal-setup"))["NAMESPACE"],
        _env(_service(compose, "temporal-ui"))["TEMPORAL_DEFAULT_NAMESPACE"],
        *(_env(_service(compose, name))["UWS_TEMPORAL_NAMESPACE"] for name in OUR_SERVICES),
    }
    assert len(namespaces) == 1, namespaces


def test_temporal_setup_registers_exactly_our_search_attributes(
        compose: dict[str, Any]) -> None:
    script = _script(_service(compose, "temporal-setup"))
    assert "temporal operator search-attribute create" in script
    pairs = re.findall(r"--name\s+(\S+)\s+--type\s+(\S+)", script)
    assert len(pairs) == len(SEARCH_ATTRIBUTES)
    assert dict(pairs) == SEARCH_ATTRIBUTES
    assert "already exist" in script  # idempotent: a second run is no failure


def test_search_attributes_fit_sql_visibility(compose: dict[str, Any]) -> None:
    temporal = _env(_service(compose, "temporal"))
    assert temporal["DB"] == "postgres12"
    # auto-setup's own test attributes would take one of the three Int slots.
    assert temporal["SKIP_ADD_CUSTOM_SEARCH_ATTRIBUTES"] == "true"
    for kind in set(SEARCH_ATTRIBUTES.values()):
        used = sum(1 for k in SEARCH_ATTRIBUTES.values() if k == kind)
        assert used <= SQL_VISIBILITY_SLOTS[kind], kind


def test_startup_order(compose: dict[str, Any]) -> None:
    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"]
                for dep, spec in _service(compose, name)["depends_on"].items()}

    assert conditions("migrate") == {"postgresql": "service_healthy"}
    assert conditions("temporal")["postgresql"] == "service_healthy"
    assert conditions("temporal-setup") == {"temporal": "service_healthy"}
    for name in ("api", "worker"):
        assert conditions(name) == {"migrate": "service_completed_successfully",
                                    "temporal-setup": "service_completed_successfully"}
    for one_shot in ("migrate", "temporal-setup"):
        assert _service(compose, one_shot)["restart"] == "no"
    assert "pg_isready" in _argv(_service(compose, "postgresql")["healthcheck"]["test"])


def test_api_healthcheck_is_the_status_route(compose: dict[str, Any], tmp_path: Path) -> None:
    from api.app import create_app
    from app.controllers import load_controllers

    api = _service(compose, "api")
    test = " ".join(_argv(api["healthcheck"]["test"]))
    assert "curl" not in test and "urllib" in test  # the image has python, not curl
    url = urlsplit(re.search(r"https?://[^'\"\s]+", test).group(0))
    assert url.hostname == "127.0.0.1"
    assert url.port == int(_env(api)["UWS_PORT"])
    assert url.path == "/status/"  # with the slash: no 301 from AppendSlash
    settings = Settings(config=ROOT / "config.toml", data_dir=tmp_path)
    app = create_app(settings, controllers=load_controllers(settings))
    get_routes = {route.path for route in app.app.routes
                  if "GET" in getattr(route, "methods", ())}
    assert url.path.rstrip("/") in get_routes


def test_api_and_worker_share_the_data_volume(compose: dict[str, Any]) -> None:
    sources = set()
    for name in ("api", "worker", "migrate"):
        service = _service(compose, name)
        data_dir = _env(service)["UWS_DATA_DIR"]
        mounts = _mounts(service)
        assert data_dir in mounts, f"{name} does not mount {data_dir}"
        sources.add((mounts[data_dir], data_dir))
    assert len(sources) == 1, sources
    (volume, _), = sources
    assert volume in compose["volumes"]  # a named volume, not a per-container directory


def test_worker_replicas_fit_the_compute_resource(compose: dict[str, Any]) -> None:
    config = tomllib.loads((ROOT / "config.toml").read_text())
    resources = config.get("available_resources", {}).values()
    worker = _service(compose, "worker")
    assert worker["deploy"]["replicas"] >= 2
    if any(r.get("resource_type") == "LocalResource" for r in resources):
        # Jobs are processes known by pid: every replica must see every replica's jobs.
        assert worker["pid"] == "host"
        # Detached jobs are reparented, and someone must reap them.
        assert worker["init"] is True


# --- Dockerfile and .dockerignore -------------------------------------------------------


def test_dockerfile_installs_the_project() -> None:
    stages = _dockerfile_stages()
    installs = [args for stage in stages for args in _instructions(stage, "RUN")
                if "pip install" in args]
    assert installs, "no pip install"
    targets = re.findall(r"pip install\s+[\"']?\.(?:\[([\w,-]+)\])?[\"']?(?:\s|$)",
                         " ".join(installs))
    assert targets, installs
    extras = {e for group in targets for e in group.split(",") if e}
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"])
    assert "jupyter" in extras  # the shipped jupyter_lab job type runs the server's Python
    for stage in stages:
        image = stage[0][1].split()[0]
        match = re.fullmatch(r"python:(\d+\.\d+)[\w.-]*", image)
        assert match, image
        assert match.group(1) in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_dockerfile_entrypoint_is_the_uws_script() -> None:
    runtime = _dockerfile_stages()[-1]
    entrypoint = json.loads(_instructions(runtime, "ENTRYPOINT")[-1])
    assert entrypoint == ["uws"]
    assert PYPROJECT["project"]["scripts"]["uws"] == "app.cli:main"
    command = json.loads(_instructions(runtime, "CMD")[-1])
    assert command[0] in _cli_subcommands()


def test_dockerfile_settings() -> None:
    runtime = _dockerfile_stages()[-1]
    env = _docker_env(runtime)
    uws = {k: v for k, v in env.items() if k.startswith("UWS_")}
    for var in uws:
        assert _setting_name(var) in Settings.model_fields, var
    Settings(**{_setting_name(k): v for k, v in uws.items()})
    # The defaults of UWS_CONFIG and UWS_DATA_DIR point into a source tree the image lacks.
    assert {"UWS_CONFIG", "UWS_DATA_DIR"} <= set(uws)
    copies = [shlex.split(args) for args in _instructions(runtime, "COPY")]
    assert ["config.toml", uws["UWS_CONFIG"]] in copies
    users = _instructions(runtime, "USER")
    assert users and users[-1] not in ("root", "0")


def test_dockerignore_keeps_sources_and_drops_state() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    setuptools = PYPROJECT["tool"]["setuptools"]
    needed = ["pyproject.toml", "config.toml",
              *(f"{module}.py" for module in setuptools["py-modules"])]
    for include in setuptools["packages"]["find"]["include"]:
        package = ROOT / include.rstrip("*.")
        needed += [str(p.relative_to(ROOT)) for p in package.rglob("*.py")
                   if "__pycache__" not in p.parts]
    assert len(needed) > 10
    for path in needed:
        assert not _dockerignored(path, patterns), f"{path} is left out of the build"
    for path in (".venv/bin/python", ".uws/postgres/PG_VERSION", ".git/HEAD",
                 "api/__pycache__/app.cpython-311.pyc", ".pytest_cache/README.md",
                 ".ruff_cache/CACHEDIR.TAG", "uws.egg-info/PKG-INFO"):
        assert _dockerignored(path, patterns), f"{path} goes into the build"
