"""A threaded HTTP server on 127.0.0.1 (free port) serving one folder, for the demo and tests."""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the terminal for progress bars
        pass


@contextmanager
def serve_folder(folder: str, host: str = "127.0.0.1"):
    """Yields the base URL ('http://127.0.0.1:PORT') while the folder is served."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="longcap-serve", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
