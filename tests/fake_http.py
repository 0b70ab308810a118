"""A JSON HTTP server on 127.0.0.1 in a thread, answering GETs from a function: the fake
Prometheus of tests that need canned answers a real one cannot be fed quickly."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from typing import Any, Callable

# (path, query parameters) -> (HTTP status, JSON body)
Respond = Callable[[str, dict[str, list[str]]], tuple[int, Any]]


class FakeJSONServer:
    def __init__(self, respond: Respond) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                status, body = respond(url.path, urllib.parse.parse_qs(url.query))
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeJSONServer":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
