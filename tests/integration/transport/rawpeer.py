"""A raw control-plane client for attack tests: plain blocking sockets that speak our handshake
and sign frames with `transport.handshake` / `transport.framing` / `transport.wire`, and that can
lie about anything (name, instance id, pid, host key, capabilities) or send any bytes at all.

Nothing here starts UCX or an Agent: the attacker is the test process itself.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

from transport import framing, wire
from transport import handshake as hs
from transport.cma import host_key
from transport.config import parse_hostport
from transport.errors import TransferError
from transport.wire import Frame, Msg


class Closed(Exception):
    """The agent closed the connection (EOF or reset)."""


def dial(address: str, timeout: float = 10.0) -> socket.socket:
    host, port = parse_hostport(address)
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_until_closed(sock: socket.socket, timeout: float, limit: int = 1 << 22) -> tuple[bytes, bool]:
    """Everything the other side sends until it closes (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    while len(out) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return bytes(out), False
        except (ConnectionResetError, BrokenPipeError):
            return bytes(out), True
        if not chunk:
            return bytes(out), True
        out += chunk
    return bytes(out), False


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """Unsigned frames in `data` (before authentication) and the incomplete tail."""
    frames, i = [], 0
    while len(data) - i >= 4:
        n = struct.unpack_from("<I", data, i)[0]
        if len(data) - i - 4 < n:
            break
        frames.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return frames, data[i:]


class RawPeer:
    """One control connection to an agent, driven by hand.

    `handshake()` completes our handshake claiming whatever identity the fields say; afterwards
    `send()` signs with the session's per-direction key (when `key` is set) and `recv()`
    verifies. `send_bytes()` puts raw bytes on the wire."""

    def __init__(self, address: str, name: str = "raw-peer", key: bytes | None = None, *,
                 instance: bytes | None = None, pid: int | None = None, host: str | None = None,
                 paths: list[str] | None = None, compat: dict | None = None, chunk: int = 8 << 20,
                 timeout: float = 10.0):
        self.address = address
        self.sock = dial(address, timeout)
        self.key = key
        self.hello = {"name": name, "instance": instance or hs.new_instance(), "host": host_key() if host is None
                      else host, "pid": os.getpid() if pid is None else pid, "chunk": chunk,
                      "paths": ["cma"] if paths is None else paths, "nonce": hs.new_nonce(),
                      "compat": dict(compat or {}), "lane": False}
        self.decoder = framing.FrameDecoder(64 << 10)
        self.mac: framing.FrameMac | None = None
        self.pending: list[Frame] = []
        self.ack: Frame | None = None
        self.timeout = timeout
        self._rid = 100

    # -- raw -------------------------------------------------------------------------------
    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg: Msg, rid: int = 0, **body: Any) -> None:
        self.send_bytes(framing.encode_frame(wire.encode(msg, rid, **body), self.mac))

    def send_body(self, body: bytes) -> None:
        """A frame whose body is `body` (any bytes), signed when the session has keys."""
        self.send_bytes(framing.encode_frame(body, self.mac))

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def recv(self, timeout: float | None = None) -> Frame:
        """The next frame; raises Closed when the agent closed the connection."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the agent")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                raise TimeoutError("no frame from the agent") from None
            except (ConnectionResetError, BrokenPipeError) as e:
                raise Closed(str(e)) from None
            if not data:
                raise Closed("EOF")
            for body in self.decoder.feed(data):
                self.pending.append(wire.decode(body, 1 << 30))
        return self.pending.pop(0)

    def recv_until(self, pred, timeout: float | None = None) -> tuple[Frame, list[Frame]]:
        """Frames until one satisfies `pred`: (that frame, the ones before it)."""
        seen = []
        while True:
            f = self.recv(timeout)
            if pred(f):
                return f, seen
            seen.append(f)

    def request(self, msg: Msg, timeout: float | None = None, **body: Any) -> tuple[Frame, list[Frame]]:
        rid = self.next_rid()
        self.send(msg, rid, **body)
        return self.recv_until(lambda f: f.rid == rid and f.type in wire.REPLY_TYPES, timeout)

    def ping(self, timeout: float | None = None) -> list[Frame]:
        """Round trip through the agent's loop: every frame sent before it has been handled.
        Returns the frames that arrived before the PONG."""
        pong, before = self.request(Msg.PING, timeout)
        assert pong.type is Msg.PONG, pong
        return before

    # -- handshake -------------------------------------------------------------------------
    def send_hello(self) -> None:
        self.send(Msg.HELLO, 1, **self.hello)

    def handshake(self) -> "RawPeer":
        self.send_hello()
        ack = self.recv()
        if ack.type is Msg.ERROR:
            raise TransferError(f"{ack.body['code']}: {ack.body['message']}")
        assert ack.type is Msg.HELLO_ACK, ack
        self.ack = ack
        th = hs.transcript(self.hello, ack.body)
        if self.key is not None and not hs.proofs_equal(hs.proof(self.key, b"server", th), ack.body["mac"]):
            raise TransferError("server failed to prove the key")
        self.send(Msg.AUTH, 2, mac=hs.proof(self.key, b"client", th))
        macs = hs.frame_macs(self.key, th, client=True)
        welcome = self.recv()
        if welcome.type is Msg.ERROR:
            raise TransferError(f"{welcome.body['code']}: {welcome.body['message']}")
        assert welcome.type is Msg.WELCOME, welcome
        self.mac = macs
        self.decoder.mac = macs
        self.decoder.limit = 1 << 30
        return self

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawPeer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RawServer:
    """A lying agent on the server side: accepts connections on 127.0.0.1, completes our
    handshake as `name` claiming whatever pid / host / paths it likes, then answers each
    request frame with `handler(conn, frame)` (in a thread per connection)."""

    def __init__(self, name: str = "liar", key: bytes | None = None, *, pid: int | None = None,
                 host: str | None = None, paths: list[str] | None = None, chunk: int = 8 << 20, handler=None):
        import threading

        self.name, self.key, self.handler = name, key, handler
        self.fields = {"name": name, "instance": hs.new_instance(), "host": host_key() if host is None else host,
                       "pid": os.getpid() if pid is None else pid, "chunk": chunk,
                       "paths": ["cma"] if paths is None else paths}
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.address = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.errors: list[BaseException] = []
        self.frames: list[Frame] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        while not self._stop:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = _ServerConn(sock)
        try:
            hello = conn.recv()
            ack = dict(self.fields, nonce=hs.new_nonce())
            th = hs.transcript(hello.body, ack)
            conn.send(Msg.HELLO_ACK, hello.rid, mac=hs.proof(self.key, b"server", th), **ack)
            auth = conn.recv()
            if not hs.proofs_equal(hs.proof(self.key, b"client", th), auth.body["mac"]):
                raise TransferError("client failed to authenticate")
            macs = hs.frame_macs(self.key, th, client=False)
            conn.decoder.mac = macs
            conn.decoder.limit = 1 << 30
            conn.send(Msg.WELCOME, auth.rid)
            conn.mac = macs
            while True:
                f = conn.recv(timeout=3600)
                self.frames.append(f)
                if f.type is Msg.PING:
                    conn.send(Msg.PONG, f.rid)
                elif self.handler is not None:
                    self.handler(conn, f)
        except (Closed, OSError):
            pass
        except BaseException as e:  # reported to the test
            self.errors.append(e)
        finally:
            sock.close()

    def close(self) -> None:
        self._stop = True
        try:
            self.lsock.close()
        except OSError:
            pass


class _ServerConn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.decoder = framing.FrameDecoder(64 << 10)
        self.mac: framing.FrameMac | None = None
        self.pending: list[Frame] = []

    def send(self, msg: Msg, rid: int = 0, **body: Any) -> None:
        self.sock.sendall(framing.encode_frame(wire.encode(msg, rid, **body), self.mac))

    def recv(self, timeout: float = 10.0) -> Frame:
        self.sock.settimeout(timeout)
        while not self.pending:
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionResetError, BrokenPipeError) as e:
                raise Closed(str(e)) from None
            if not data:
                raise Closed("EOF")
            for body in self.decoder.feed(data):
                self.pending.append(wire.decode(body, 1 << 30))
        return self.pending.pop(0)


class Relay:
    """A man in the middle without any key: accepts connections on 127.0.0.1 and relays each to
    `target`, frame by frame. `c2s(i, frame, signed)` / `s2c(...)` return the list of frames to
    forward in place of frame number `i` of that direction (whole frames, header included;
    `signed`: the frame carries a MAC, i.e. it follows AUTH / WELCOME). Everything seen is kept
    in `seen` as (direction, frame)."""

    def __init__(self, target: str, c2s=None, s2c=None):
        import threading

        self.target = target
        self.c2s = c2s or (lambda i, f, signed: [f])
        self.s2c = s2c or (lambda i, f, signed: [f])
        self.seen: list[tuple[str, bytes]] = []
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.address = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            try:
                b = dial(self.target)
            except OSError:
                a.close()
                continue
            a.settimeout(None)
            b.settimeout(None)
            self.pairs.append((a, b))
            state = {"c2s_signed": False, "s2c_signed": False}
            threading.Thread(target=self._pump, args=(a, b, "c2s", state), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, "s2c", state), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, state: dict) -> None:
        buf = bytearray()
        i = 0
        fn = self.c2s if direction == "c2s" else self.s2c
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                buf += data
                while len(buf) >= 4:
                    n = struct.unpack_from("<I", buf)[0]
                    if len(buf) < 4 + n:
                        break
                    frame = bytes(buf[:4 + n])
                    del buf[:4 + n]
                    signed = state[f"{direction}_signed"]
                    with self._lock:
                        self.seen.append((direction, frame))
                    if not signed:
                        try:
                            t = wire.decode(frame[4:], 1 << 30).type
                        except TransferError:
                            t = None
                        # frames after AUTH (client->server) / WELCOME (server->client) carry MACs
                        if (direction, t) in (("c2s", Msg.AUTH), ("s2c", Msg.WELCOME)):
                            state[f"{direction}_signed"] = True
                    for out in fn(i, frame, signed):
                        dst.sendall(out)
                    i += 1
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def frames(self, direction: str) -> list[bytes]:
        with self._lock:
            return [f for d, f in self.seen if d == direction]

    def close(self) -> None:
        try:
            self.lsock.close()
        except OSError:
            pass
        for a, b in self.pairs:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


def rewrite_body(frame: bytes, **changes: Any) -> bytes:
    """An unsigned frame with some body fields replaced (re-encoded, new length header)."""
    f = wire.decode(frame[4:], 1 << 30)
    body = dict(f.body, **changes)
    out = wire.encode(f.type, f.rid, **body)
    return struct.pack("<I", len(out)) + out


def frame_type(frame: bytes, signed: bool) -> Msg | None:
    body = frame[4:-framing.MAC_BYTES] if signed else frame[4:]
    try:
        return wire.decode(body, 1 << 30).type
    except TransferError:
        return None
