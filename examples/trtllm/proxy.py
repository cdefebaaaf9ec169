"""A small disaggregation proxy for two `trtllm-serve` instances using the UCX KV connector.

For each OpenAI completion / chat completion request it
1. picks a fresh routing id and makes it the request's ``cache_salt`` (``nixl-rt:<id>``) on
   both legs (a client's own ``cache_salt`` is replaced: the fresh salt already keeps the
   request's blocks apart from every other request's);
2. sends the request to the context instance with ``max_tokens=1`` (non-streaming): the
   context instance computes the prompt and holds its KV blocks under a lease for that salt;
3. forwards the original request to the generation instance: its connector finds the lease by
   the salt's hash (``cache_salt_id``, the only part of the salt TensorRT-LLM hands a
   connector), pulls the prompt's KV and decodes; the answer (streamed or not) goes back.

If the context leg fails, or the generation instance cannot get the blocks, the generation
instance computes the prompt itself: the client still gets its answer.

Standard library only; for trying the connector out, not for production routing.
"""
from __future__ import annotations

import argparse
import json
import logging
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

ROUTING_PREFIX = "nixl-rt:"
PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_BODY_BYTES = 16 << 20


@dataclass(frozen=True)
class ProxyConfig:
    context_url: str
    generation_url: str
    timeout_s: float = 600.0


def leg_requests(body: dict[str, Any], routing_id: str) -> tuple[dict, dict]:
    """The context-leg and generation-leg request bodies for one client request."""
    salt = f"{ROUTING_PREFIX}{routing_id}"
    ctx = dict(body, max_tokens=1, stream=False, cache_salt=salt)
    ctx.pop("stream_options", None)
    if "max_completion_tokens" in ctx:
        ctx["max_completion_tokens"] = 1
    gen = dict(body, cache_salt=salt)
    return ctx, gen


def _post(url: str, body: dict, timeout: float):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def make_handler(cfg: ProxyConfig) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, code: int, payload: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            if self.path not in PATHS:
                self._reply(404, b'{"error": "unknown path"}')
                return
            n = int(self.headers.get("Content-Length", "0"))
            if n <= 0 or n > MAX_BODY_BYTES:
                self._reply(400, b'{"error": "bad body size"}')
                return
            try:
                body = json.loads(self.rfile.read(n))
            except json.JSONDecodeError:
                self._reply(400, b'{"error": "body is not JSON"}')
                return
            if not isinstance(body, dict):
                self._reply(400, b'{"error": "body must be an object"}')
                return
            rid = uuid.uuid4().hex
            ctx_body, gen_body = leg_requests(body, rid)
            try:
                with _post(cfg.context_url + self.path, ctx_body, cfg.timeout_s) as r:
                    r.read()
            except (urllib.error.URLError, OSError) as e:
                # The generation instance finds no lease for this salt and computes the prompt.
                logger.warning("context leg of %s failed (%s); the generation instance computes it", rid, e)
            try:
                upstream = _post(cfg.generation_url + self.path, gen_body, cfg.timeout_s)
            except urllib.error.HTTPError as e:
                self._reply(e.code, e.read())
                return
            except (urllib.error.URLError, OSError) as e:
                self._reply(502, json.dumps({"error": f"generation instance: {e}"}).encode())
                return
            with upstream:
                self.send_response(upstream.status)
                self.send_header("Content-Type", upstream.headers.get("Content-Type", "application/json"))
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while True:
                    chunk = upstream.read1(65536) if hasattr(upstream, "read1") else upstream.read(65536)
                    if not chunk:
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.info("%s " + fmt, self.address_string(), *args)

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--context", required=True, help="base URL of the context instance, e.g. http://host:8001")
    ap.add_argument("--generation", required=True, help="base URL of the generation instance")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = ProxyConfig(args.context.rstrip("/"), args.generation.rstrip("/"))
    server = ThreadingHTTPServer((args.host, args.port), make_handler(cfg))
    logger.info("proxy on %s:%d -> context %s, generation %s", args.host, args.port,
                cfg.context_url, cfg.generation_url)
    server.serve_forever()


if __name__ == "__main__":
    main()
