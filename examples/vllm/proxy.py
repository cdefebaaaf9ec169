#!/usr/bin/env python3
"""A small routing proxy for trying disaggregated prefill/decode with UcxConnector.

For each /v1/completions request: send it to a prefill server with
`kv_transfer_params={"do_remote_decode": true}` and `max_tokens=1`, then send the original
request to a decode server with the `kv_transfer_params` that prefill returned. The keys are
those of vLLM's NixlConnector, so production routers (vLLM's router, llm-d, Dynamo) drive
UcxConnector unchanged; this proxy is for trying it out. Standard library only.

    python examples/vllm/proxy.py --port 8000 --prefill http://127.0.0.1:8100 \
        --decode http://127.0.0.1:8200
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)


def post_json(url: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg: same prompt, one token, ask for a remote decode hand-off."""
    out = dict(body)
    out["max_tokens"] = 1
    out.pop("max_completion_tokens", None)
    out["stream"] = False
    out["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False,
                                 "remote_engine_id": None, "remote_block_ids": None,
                                 "remote_host": None, "remote_port": None}
    return out


def decode_request(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None
                   ) -> dict[str, Any]:
    out = dict(body)
    if kv_transfer_params:
        out["kv_transfer_params"] = kv_transfer_params
    return out


def disagg_completion(prefill_url: str, decode_url: str, body: dict[str, Any]) -> dict[str, Any]:
    p = post_json(f"{prefill_url}/v1/completions", prefill_request(body))
    return post_json(f"{decode_url}/v1/completions",
                     decode_request(body, p.get("kv_transfer_params")))


def make_handler(prefills: list[str], decodes: list[str]) -> type[BaseHTTPRequestHandler]:
    rr_p, rr_d = itertools.cycle(prefills), itertools.cycle(decodes)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/completions":
                self._send(404, {"error": "only /v1/completions is routed"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if body.get("stream"):
                    raise ValueError("streaming is not supported by this example proxy")
                self._send(200, disagg_completion(next(rr_p), next(rr_d), body))
            except urllib.error.HTTPError as e:
                self._send(e.code, {"error": e.read().decode(errors="replace")})
            except Exception as e:  # noqa: BLE001 - report any failure to the client
                logger.exception("proxy failure")
                self._send(502, {"error": f"{type(e).__name__}: {e}"})

        def _send(self, code: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug(fmt, *args)

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prefill", action="append", required=True, help="prefill base URL")
    ap.add_argument("--decode", action="append", required=True, help="decode base URL")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    srv = ThreadingHTTPServer((args.host, args.port), make_handler(args.prefill, args.decode))
    logger.info("proxy on %s:%d -> prefill %s, decode %s", args.host, args.port,
                args.prefill, args.decode)
    srv.serve_forever()


if __name__ == "__main__":
    main()
