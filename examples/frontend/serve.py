#!/usr/bin/env python3
"""Serve the demo frontend (index.html, app.js, style.css) with the standard library only.

With `segno` installed (`pip install segno`), `POST /qr` also turns the page's `otpauth://`
URI into a QR code (an SVG data URI) for authenticator apps; without it the page shows the
secret to type in. The URI never leaves this machine's page server.

    python examples/frontend/serve.py --port 8080 --api http://127.0.0.1:8000

The page runs on its own origin (here http://127.0.0.1:8080), so tessera must list that
origin in TESSERA_CORS_ORIGINS. `--port 0` picks a free port. The first line printed on
stdout is always `page: <address>`, for scripts and tests to read.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

HERE = Path(__file__).resolve().parent
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    # The pages mailed links open (TESSERA_PUBLIC_URL = this page's origin): the same app.
    "/verify-email": ("index.html", "text/html; charset=utf-8"),
    "/reset-password": ("index.html", "text/html; charset=utf-8"),
    "/confirm-email": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


def make_handler(api: str, quiet: bool) -> type[BaseHTTPRequestHandler]:
    parts = urlsplit(api)
    api_origin = f"{parts.scheme}://{parts.netloc}"
    csp = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
           f"connect-src 'self' {api_origin}; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")

    class Handler(BaseHTTPRequestHandler):
        server_version = "tessera-demo"
        sys_version = ""

        def do_GET(self) -> None:
            self._serve(with_body=True)

        def do_HEAD(self) -> None:
            self._serve(with_body=False)

        def do_POST(self) -> None:
            if urlsplit(self.path).path != "/qr":
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            length = int(self.headers.get("Content-Length") or 0)
            text = self.rfile.read(min(length, 4096)).decode("utf-8", "replace")
            try:
                import segno
            except ImportError:
                self.send_error(HTTPStatus.NOT_IMPLEMENTED, "pip install segno for QR codes")
                return
            if length > 4096 or not text.startswith("otpauth://"):
                self.send_error(HTTPStatus.BAD_REQUEST)
                return
            body = segno.make(text, error="m").svg_data_uri(scale=4).encode()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _serve(self, *, with_body: bool) -> None:
            path = urlsplit(self.path).path
            entry = FILES.get(path)
            if path == "/config.js":
                # Where tessera is, for pages opened from a mailed link (no `?api=` there).
                body = f"window.TESSERA_API = {json.dumps(api)};\n".encode()
                content_type = "text/javascript; charset=utf-8"
            elif entry is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            else:
                name, content_type = entry
                body = (HERE / name).read_bytes()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Content-Security-Policy", csp)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            if not quiet:
                super().log_message(format, *args)

    return Handler


def wait_for(api: str, seconds: float) -> bool:
    """True once tessera's /healthz answers 200, False after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            # `api` is checked to be http(s) in main().
            with urllib.request.urlopen(f"{api}/healthz", timeout=1) as response:  # noqa: S310
                if response.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port, 0 for any (8080)")
    parser.add_argument("--api", default="http://127.0.0.1:8000",
                        help="tessera's base URL (http://127.0.0.1:8000)")
    parser.add_argument("--wait", type=float, default=0,
                        help="seconds to wait for tessera's /healthz before announcing (0)")
    parser.add_argument("--quiet", action="store_true", help="no request log on stderr")
    args = parser.parse_args(argv)
    api = args.api.rstrip("/")
    if urlsplit(api).scheme not in ("http", "https") or not urlsplit(api).netloc:
        parser.error(f"--api must be an http(s) URL, not {args.api!r}")

    server = ThreadingHTTPServer((args.host, args.port), make_handler(api, args.quiet))
    server.daemon_threads = True
    origin = f"http://{args.host}:{server.server_port}"
    page = f"{origin}/?api={quote(api, safe=':/')}"
    print(f"page: {page}", flush=True)
    try:
        if args.wait > 0:
            up = wait_for(api, args.wait)
            print(f"\ntessera {'answers' if up else 'does not answer (yet)'} at {api}; it must "
                  f"allow this page's origin: TESSERA_CORS_ORIGINS={origin}", flush=True)
        print(f"Open {page} in a browser. Ctrl-C stops.", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
