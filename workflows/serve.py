"""A threaded HTTP server on 127.0.0.1 (free port), for the demo and tests."""

from __future__ import annotations

import functools
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the terminal for progress bars
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # img2dataset opens many connections at once

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up is not news
            super().handle_error(request, client_address)


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1"):
    """Yields the base URL ('http://127.0.0.1:PORT') while `handler` answers requests."""
    server = _Server((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="longcap-serve", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def serve_folder(folder: str, host: str = "127.0.0.1"):
    """Serve one folder's files (content type by extension)."""
    return serve(functools.partial(_QuietHandler, directory=str(folder)), host)
