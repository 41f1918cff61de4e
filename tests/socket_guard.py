"""Run a Python script with every network connection refused and recorded.

    python tests/socket_guard.py LOG_FILE script.py args...

Patches ``socket.socket.connect``/``connect_ex``, ``socket.create_connection`` and
``socket.getaddrinfo`` before the script imports anything; each attempt is appended to
LOG_FILE with its stack and fails with OSError, so a library that swallows the error still
leaves a trace. Unix-domain sockets are allowed (nothing network-facing uses them).
Importing this module changes nothing; only running it does.
"""

import os
import runpy
import socket
import sys
import traceback


def install(log_file: str) -> None:
    def record(what: str, target) -> None:
        with open(log_file, "a") as f:
            f.write(f"{what} {target!r} pid={os.getpid()}\n{''.join(traceback.format_stack(limit=40)[:-2])}\n---\n")

    def guarded(original):
        def connect(self, address):
            if self.family == socket.AF_UNIX:
                return original(self, address)
            record("connect", address)
            raise OSError(f"socket guard: connection to {address!r} refused")
        return connect

    def create_connection(address, *args, **kwargs):
        record("create_connection", address)
        raise OSError(f"socket guard: connection to {address!r} refused")

    def getaddrinfo(host, *args, **kwargs):
        record("getaddrinfo", host)
        raise socket.gaierror(f"socket guard: lookup of {host!r} refused")

    socket.socket.connect = guarded(socket.socket.connect)
    socket.socket.connect_ex = guarded(socket.socket.connect_ex)
    socket.create_connection = create_connection
    socket.getaddrinfo = getaddrinfo


if __name__ == "__main__":
    log_file, script, *rest = sys.argv[1:]
    install(log_file)
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
