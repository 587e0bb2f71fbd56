"""A threaded HTTP server on 127.0.0.1 (free port), for the demo and tests."""

from __future__ import annotations

import functools
import mimetypes
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

import fsspec


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


class _FsspecHandler(BaseHTTPRequestHandler):
    """GET of a file under an fsspec folder (a synthetic world on s3://): 200 with its bytes, or 404."""
    fs, root = None, ""

    def do_GET(self):  # noqa: N802 - the http.server name
        rel = self.path.split("?", 1)[0].lstrip("/")
        if ".." in rel.split("/"):
            self.send_error(404)
            return
        try:
            data = self.fs.cat_file(f"{self.root}/{rel}")
        except (FileNotFoundError, IsADirectoryError):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(rel)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def serve_folder(folder: str, host: str = "127.0.0.1"):
    """Serve one folder's files (content type by extension): a local folder, or any fsspec URL."""
    fs, root = fsspec.core.url_to_fs(str(folder).rstrip("/"))
    if "file" in fs.protocol:
        return serve(functools.partial(_QuietHandler, directory=root), host)
    return serve(type("Handler", (_FsspecHandler,), {"fs": fs, "root": root}), host)
