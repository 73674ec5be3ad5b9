"""A throw-away PostgreSQL server on loopback for the tests (Debian's ``postgresql`` package).

``.ci/run`` installs the package; this starts a private cluster in a temporary directory on a free
port (as the ``postgres`` user when the tests run as root, since PostgreSQL refuses to run as
root), yields a ``postgresql://`` URL of a fresh database, and removes everything afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from typing import Iterator, List, Optional

__all__ = ["postgres_bin", "postgres_server"]


def postgres_bin() -> Optional[str]:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, or Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(versions[-1]) if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(database: str = "oxoptim_test") -> Iterator[str]:
    bindir = postgres_bin()
    assert bindir is not None, "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    as_user: List[str] = []
    root = tempfile.mkdtemp(prefix="oxoptim-pg-", dir="/tmp")
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, log = os.path.join(root, "data"), os.path.join(root, "server.log")
    port = _free_port()
    try:
        subprocess.run(as_user + [os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
                                  "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
        subprocess.run(as_user + [os.path.join(bindir, "pg_ctl"), "-D", data, "-l", log, "-o", options, "-w",
                                  "-t", "60", "start"], check=True, capture_output=True)
        try:
            import psycopg  # SQLAlchemy's driver for postgresql:// URLs

            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                 autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {database}")
            yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
        finally:
            subprocess.run(as_user + [os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "stop"],
                           capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
