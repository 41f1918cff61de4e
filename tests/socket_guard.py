"""Run a Python script with every network connection refused and recorded.

    python tests/socket_guard.py LOG_FILE script.py args...

Patches ``socket.socket.connect``/``connect_ex``, ``socket.create_connection`` and
``socket.getaddrinfo`` before anything else is imported; each attempt is appended to
LOG_FILE (one line) and fails with OSError, so a library that retries quietly still
leaves a trace. Unix-domain sockets are allowed (nothing network-facing uses them).
"""

import os
import runpy
import socket
import sys
import traceback

LOG = sys.argv[1]


def _record(what: str, target) -> None:
    stack = "".join(traceback.format_stack(limit=40)[:-2])
    with open(LOG, "a") as f:
        f.write(f"{what} {target!r} pid={os.getpid()}\n{stack}\n---\n")


def _guarded_connect(original):
    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return original(self, address)
        _record("connect", address)
        raise OSError(f"socket guard: connection to {address!r} refused")
    return connect


def _create_connection(address, *args, **kwargs):
    _record("create_connection", address)
    raise OSError(f"socket guard: connection to {address!r} refused")


def _getaddrinfo(host, *args, **kwargs):
    _record("getaddrinfo", host)
    raise socket.gaierror(f"socket guard: lookup of {host!r} refused")


socket.socket.connect = _guarded_connect(socket.socket.connect)
socket.socket.connect_ex = _guarded_connect(socket.socket.connect_ex)
socket.create_connection = _create_connection
socket.getaddrinfo = _getaddrinfo

if __name__ == "__main__":
    script, *rest = sys.argv[2:]
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
