"""A throwaway PostgreSQL server for tests of warehouses whose DuckLake catalog is in PostgreSQL.

The server is the distribution's own PostgreSQL (15 on the CI image, any version that has
initdb, pg_ctl, postgres, createdb and psql), started in a new temporary folder: it listens on
127.0.0.1 at a free port and on a unix socket in that folder, trusts every local connection,
and is stopped and deleted when the tests are done. Nothing is mocked and nothing is reached
over the network.

Where PostgreSQL is missing, install it from the distribution's packages (Debian/Ubuntu):

    apt-get install -y postgresql-15

In CI (environment variable CI set), running as root with apt-get available, the helper runs
that install itself (quietly) before giving up; anywhere else the tests are skipped, saying why.

initdb and postgres refuse to run as root: as root, the server runs as the `postgres` user the
Debian package creates, else as `nobody`, and its folder is handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("initdb", "pg_ctl", "postgres", "createdb", "psql")
APT_PACKAGE = "postgresql-15"
SUPERUSER = "featurestore"  # the server's superuser role; trust auth, so no password
START_TIMEOUT_SECONDS = 30


class PostgresUnavailable(Exception):
    """No PostgreSQL binaries here (the message says what was looked for)."""


def _has_binaries(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in BINARIES)


def _version_key(folder: str) -> tuple[int, ...]:
    """/usr/lib/postgresql/15/bin -> (15,): the newest installed major version first."""
    return tuple(int(part) for part in Path(folder).parent.name.split(".") if part.isdigit())


def find_bindir() -> Path | None:
    """The folder of the BINARIES: pg_config's, else the newest
    /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH), else where PATH's initdb
    really lives."""
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if found.returncode == 0:
            candidates.append(found.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    return next((Path(c) for c in candidates if c and _has_binaries(Path(c))), None)


def _install_in_ci() -> None:
    """apt-get install PostgreSQL, only where that is expected to work and wanted: CI, as root,
    on a distribution with apt-get. Failures are left to the caller's 'not found'."""
    if not (os.environ.get("CI") and os.geteuid() == 0 and shutil.which("apt-get")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", APT_PACKAGE], env=env,
                   capture_output=True)


def locate_binaries() -> Path:
    bindir = find_bindir()
    if bindir is None:
        _install_in_ci()
        bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            f"no PostgreSQL server binaries ({', '.join(BINARIES)}) in `pg_config --bindir`, "
            f"/usr/lib/postgresql/*/bin or on PATH; install them with "
            f"`apt-get install -y {APT_PACKAGE}`")
    return bindir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as when we are root; None: run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root, and neither a `postgres` nor a `nobody` user "
                              "exists to run PostgreSQL as (initdb refuses root)")


@dataclass
class PostgresServer:
    """A running server: `catalog(database)` is the featurestore --catalog string of a database
    on it, `create_database` makes a new one."""

    bindir: Path
    folder: Path  # holds data/ (the cluster), the unix socket and server.log
    port: int
    user: pwd.struct_passwd | None
    _databases: int = 0

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        """One of the server's binaries, as the server's user, failing with its output."""
        user = {}
        if self.user is not None:
            user = dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        # The server's user may not be able to enter our working directory (pytest's tmp).
        done = subprocess.run([str(self.bindir / args[0]), *args[1:]], cwd=self.folder,
                              env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
                              capture_output=True, text=True, **user)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): "
                               f"{done.stdout}{done.stderr}{log}")
        return done

    def start(self) -> None:
        self._run("initdb", "--pgdata", str(self.data), "--username", SUPERUSER,
                  "--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync")
        # A throwaway server: durability (fsync, full pages) only costs the tests time.
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.folder} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "start", "--pgdata", str(self.data), "--log", str(self.log),
                  "--wait", "--timeout", str(START_TIMEOUT_SECONDS), "--options", options)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "--pgdata", str(self.data), "--mode", "immediate",
                      "--wait")

    def create_database(self) -> str:
        """A new, empty database; its name."""
        self._databases += 1
        name = f"featurestore_{self._databases}"
        self._run("createdb", "--host", "127.0.0.1", "--port", str(self.port),
                  "--username", SUPERUSER, name)
        return name

    def catalog(self, database: str) -> str:
        """The database as a libpq key=value --catalog string."""
        return f"postgres:dbname={database} host=127.0.0.1 port={self.port} user={SUPERUSER}"

    def catalog_uri(self, database: str) -> str:
        """The same database as a libpq URI --catalog string."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _psql(self, database: str) -> list[str]:
        return [str(self.bindir / "psql"), "--no-psqlrc", "--quiet", "--tuples-only",
                "--no-align", "--set", "ON_ERROR_STOP=1", "--host", "127.0.0.1",
                "--port", str(self.port), "--username", SUPERUSER, "--dbname", database]

    def query(self, database: str, sql: str) -> list[str]:
        """The rows of one SQL statement, each as psql prints it (columns joined by |)."""
        done = subprocess.run([*self._psql(database), "--command", sql], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {done.stderr}")
        return done.stdout.splitlines()

    @contextmanager
    def transaction(self, database: str, statements: str) -> Iterator[None]:
        """Run `statements` in a transaction that stays open (with its locks, and what it
        created, invisible to others) until the block exits, then is rolled back."""
        session = subprocess.Popen(self._psql(database), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            session.stdin.write(f"BEGIN; {statements}; SELECT 'begun';\n")
            session.stdin.flush()
            reply = session.stdout.readline().strip()  # psql answers once all statements ran
            if reply != "begun":
                raise RuntimeError(f"psql {statements!r} failed: {reply}{session.stdout.read()}")
            yield
        finally:
            session.communicate("ROLLBACK;\n", timeout=30)


@contextmanager
def postgres_server(bindir: Path | None = None) -> Iterator[PostgresServer]:
    """A started server (from `bindir`, default locate_binaries()), stopped and deleted on
    exit. Raises PostgresUnavailable when there is no PostgreSQL to start."""
    bindir = bindir or locate_binaries()
    user = _server_user()
    # Our own folder under /tmp (which every user can enter), not pytest's tmp_path: that sits
    # in a folder only its owner may enter, and the server's user must reach its data.
    folder = Path(tempfile.mkdtemp(prefix="featurestore-pg-"))
    if user is not None:
        os.chown(folder, user.pw_uid, user.pw_gid)
    server = PostgresServer(bindir, folder, _free_port(), user)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
