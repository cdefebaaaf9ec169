"""The example proxy: leg requests, and the order it talks to two fake instances."""
from __future__ import annotations

import importlib.util
import json
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _load_example(path: Path, name: str):
    """Import an example script under a unique module name (examples/vllm has a proxy.py too)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


proxy = _load_example(REPO / "examples" / "trtllm" / "proxy.py", "trtllm_example_proxy")
from nixl_connectors.trtllm.config import ConnectorRole  # noqa: E402
from nixl_connectors.trtllm.routing import Leg, routing_of  # noqa: E402
from trtllm_standin.llm_request import CppLlmRequest, PyLlmRequest  # noqa: E402


def test_both_legs_carry_one_fresh_salt_that_routes_to_one_key():
    body = {"model": "m", "prompt": "hi", "max_tokens": 50, "stream": True, "cache_salt": "client",
            "stream_options": {"include_usage": True}}
    ctx, gen = proxy.leg_requests(body, "abc")
    assert ctx["max_tokens"] == 1 and ctx["stream"] is False and "stream_options" not in ctx
    assert gen["max_tokens"] == 50 and gen["stream"] is True
    assert ctx["cache_salt"] == gen["cache_salt"] == "nixl-rt:abc"
    # what each instance's connector sees: the C++ request's cache_salt_id only
    rc = routing_of(CppLlmRequest(PyLlmRequest(1, [1, 2], 1, cache_salt=ctx["cache_salt"])), ConnectorRole.CONTEXT)
    rg = routing_of(CppLlmRequest(PyLlmRequest(2, [1, 2], 1, cache_salt=gen["cache_salt"])), ConnectorRole.GENERATION)
    assert (rc.leg, rg.leg) == (Leg.CONTEXT, Leg.GENERATION) and rc.key == rg.key
    assert body["max_tokens"] == 50 and body["cache_salt"] == "client"   # the client's body is untouched


def test_chat_completion_limits():
    ctx, gen = proxy.leg_requests({"messages": [], "max_completion_tokens": 9}, "x")
    assert ctx["max_completion_tokens"] == 1 and gen["max_completion_tokens"] == 9


def _fake_instance(name: str, log: list):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.append((name, self.path, body))
            out = json.dumps({"from": name, "choices": [{"text": "ok"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def servers():
    log: list = []
    ctx, gen = _fake_instance("ctx", log), _fake_instance("gen", log)
    cfg = proxy.ProxyConfig(f"http://127.0.0.1:{ctx.server_port}", f"http://127.0.0.1:{gen.server_port}")
    px = ThreadingHTTPServer(("127.0.0.1", 0), proxy.make_handler(cfg))
    threading.Thread(target=px.serve_forever, daemon=True).start()
    yield px, log
    for s in (px, ctx, gen):
        s.shutdown()
        s.server_close()


def test_proxy_sends_context_leg_first_then_forwards(servers):
    px, log = servers
    req = urllib.request.Request(f"http://127.0.0.1:{px.server_port}/v1/completions",
                                 data=json.dumps({"prompt": "p", "max_tokens": 8}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.read())["from"] == "gen"
    assert [e[0] for e in log] == ["ctx", "gen"]
    (_, _, cb), (_, _, gb) = log
    assert cb["max_tokens"] == 1 and gb["max_tokens"] == 8
    assert cb["cache_salt"] == gb["cache_salt"] and cb["cache_salt"].startswith("nixl-rt:")


def test_proxy_rejects_unknown_paths_and_bad_bodies(servers):
    px, _ = servers
    for path, data in (("/v1/other", b"{}"), ("/v1/completions", b"not json")):
        req = urllib.request.Request(f"http://127.0.0.1:{px.server_port}{path}", data=data, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code in (400, 404)


def test_a_failed_context_leg_still_gets_the_client_an_answer():
    log: list = []
    gen = _fake_instance("gen", log)
    dead = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    dead_port = dead.server_port
    dead.server_close()                      # nothing listens there any more
    cfg = proxy.ProxyConfig(f"http://127.0.0.1:{dead_port}", f"http://127.0.0.1:{gen.server_port}",
                            timeout_s=30)
    px = ThreadingHTTPServer(("127.0.0.1", 0), proxy.make_handler(cfg))
    threading.Thread(target=px.serve_forever, daemon=True).start()
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{px.server_port}/v1/completions",
                                     data=json.dumps({"prompt": "p", "max_tokens": 8}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["from"] == "gen"
        assert [e[0] for e in log] == ["gen"]
    finally:
        for s in (px, gen):
            s.shutdown()
            s.server_close()
