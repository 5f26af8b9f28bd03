"""A TCP relay a test can cut: a real outage of a real service (PostgreSQL, Redis) for the process
under test, without stopping the service the other tests share."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import sqlalchemy as sa


class Relay:
    """Forwards 127.0.0.1:<port> to `target`; `close()` drops every connection and stops listening, and
    `open()` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._sockets: list[socket.socket] = []
        self._open = False
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.port = listener.getsockname()[1]
        with self._lock:
            self._open = True
        self._track(listener)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            sockets, self._sockets, self._open = self._sockets, [], False
        for sock in sockets:
            _drop(sock)

    def _track(self, sock: socket.socket) -> bool:
        """Keep `sock` to drop at `close()`; a socket that arrives once the relay is closed is dropped now."""
        with self._lock:
            if self._open:
                self._sockets.append(sock)
                return True
        _drop(sock)
        return False

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            if not self._track(client):
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _drop(client)
                continue
            if not self._track(upstream):
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _drop(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@contextlib.contextmanager
def relayed(url: str) -> Iterator[tuple[Relay, str]]:
    """A relay open to the service at `url` (a SQLAlchemy or Redis URL), and `url` through it."""
    parsed = sa.make_url(url)
    relay = Relay((parsed.host or "127.0.0.1", parsed.port or 5432))
    relay.open()
    try:
        yield relay, parsed.set(port=relay.port).render_as_string(hide_password=False)
    finally:
        relay.close()
