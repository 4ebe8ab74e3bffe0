"""A stand-in for vLLM's OpenAI-compatible server: answers at once, loads nothing."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", dest="served")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args, _ignored = parser.parse_known_args()
    served = args.served or args.model

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": served, "object": "model"}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            if self.path == "/v1/chat/completions":
                self._send(200, {"id": "standin", "object": "chat.completion", "model": served,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "ok"}}]})
            else:
                self._send(404, {"error": "not found"})

        def log_message(self, *_args) -> None:
            return

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"stand-in for vLLM serving {served} on {args.host}:{args.port}", flush=True)
    # Like a server that logs its configuration: STANDIN_ECHO_ENV names variables whose
    # values it prints (the tests follow a secret through the collected log).
    for name in filter(None, os.environ.get("STANDIN_ECHO_ENV", "").split(",")):
        print(f"config {name}={os.environ.get(name, '')}", flush=True)
    print("Application startup complete.", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
