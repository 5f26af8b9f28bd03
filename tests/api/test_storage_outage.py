"""The metadata database goes away under a running server: requests that need it get 503
storage_unavailable with Retry-After (not an internal error), and the server serves again once the
database is back. The outage is real: the server talks to PostgreSQL through a TCP relay that the test
closes (every connection and the listening port) and opens again."""

from __future__ import annotations

import contextlib
import socket
import threading

import sqlalchemy as sa

from .support import error_of


class Relay:
    """Forwards 127.0.0.1:<port> to `target`; `close()` drops every connection and stops listening."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.port = listener.getsockname()[1]
        self._track(listener)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            self._track(client)
            self._track(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_a_database_outage_is_a_503_to_retry_and_the_server_serves_again(make_client, postgres_url):
    url = sa.make_url(postgres_url)
    relay = Relay((url.host or "127.0.0.1", url.port or 5432))
    relay.open()
    try:
        through_relay = url.set(port=relay.port).render_as_string(hide_password=False)
        client = make_client(database_url=through_relay)
        assert client.get("/api/v1/jobs").status_code == 200

        relay.close()  # the database goes away
        response = client.get("/api/v1/jobs")
        assert response.status_code == 503, response.text
        assert error_of(response)["type"] == "storage_unavailable" and response.headers["retry-after"] == "5"

        relay.open()  # and comes back, on the same port
        assert client.get("/api/v1/jobs").status_code == 200
    finally:
        relay.close()
