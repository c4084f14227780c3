"""A small HTTP/1.1 relay on 127.0.0.1 in front of the real Swift proxy that injects network faults.

It understands just enough HTTP to find request boundaries (Content-Length or chunked bodies, keep-alive),
so it can act on one specific request:

* ``drop_puts``: the next N PUTs whose path contains ``match`` are cut off half-way through their body
  (both sides closed, the client with a TCP reset), as a dying link or a restarted load balancer would;
* ``pass_puts``: that many such PUTs go through before ``drop_puts`` starts cutting (fail after N segments);
* ``bad_etag_puts``: the next N such PUTs go through untouched, but the ETag of the response is replaced,
  as a buggy or malicious middlebox might.

``events`` records what was done, so tests can check the fault really happened.
"""
from __future__ import annotations

import socket
import struct
import threading
from typing import BinaryIO

BOGUS_ETAG = "0123456789abcdef0123456789abcdef"


class FaultProxy:
    def __init__(self, upstream_port: int, match: str = "_segments/") -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.match = match
        self.drop_puts = 0
        self.pass_puts = 0
        self.puts: list[str] = []  # every targeted PUT's path, in arrival order
        self.bad_etag_puts = 0
        self.events: list[tuple[str, str]] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(32)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth_url(self) -> str:
        return f"{self.url}/auth/v1.0"

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the other thread
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.close()
            except OSError:
                pass
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ plumbing
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take(self, budget: str) -> bool:
        with self._lock:
            left = getattr(self, budget)
            if left > 0:
                setattr(self, budget, left - 1)
                return True
            return False

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        with self._lock:
            self._conns.update((client, upstream))
        cin, uin = client.makefile("rb"), upstream.makefile("rb")
        try:
            while self._relay_one(client, cin, upstream, uin):
                pass
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.close()
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(client)
                self._conns.discard(upstream)

    @staticmethod
    def _read_head(f: BinaryIO) -> list[bytes] | None:
        lines = []
        while True:
            line = f.readline(65537)
            if not line:
                return None
            if line in (b"\r\n", b"\n"):
                return lines
            lines.append(line)

    @staticmethod
    def _header(lines: list[bytes], name: bytes) -> bytes | None:
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name:
                return v.strip()
        return None

    @staticmethod
    def _relay_body(src: BinaryIO, dst: socket.socket, lines: list[bytes], limit: int | None = None) -> int:
        """Copy a message body; ``limit`` stops after that many bytes (to cut a request short)."""
        te = FaultProxy._header(lines, b"transfer-encoding")
        if te is not None and b"chunked" in te.lower():
            while True:
                size_line = src.readline(1024)
                dst.sendall(size_line)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the blank line
                        t = src.readline(65537)
                        dst.sendall(t)
                        if t in (b"\r\n", b"\n", b""):
                            return 0
                dst.sendall(src.read(size + 2))
        cl = FaultProxy._header(lines, b"content-length")
        left = int(cl) if cl is not None else 0
        if limit is not None:
            left = min(left, limit)
        sent = 0
        while left:
            piece = src.read(min(left, 256 * 1024))
            if not piece:
                break
            dst.sendall(piece)
            left -= len(piece)
            sent += len(piece)
        return sent

    def _relay_one(self, client: socket.socket, cin: BinaryIO, upstream: socket.socket, uin: BinaryIO) -> bool:
        req = self._read_head(cin)
        if req is None:
            return False
        with self._lock:
            self.requests += 1
        method, path = req[0].split(b" ")[:2]
        targeted = method == b"PUT" and self.match.encode() in path
        if (self._header(req, b"expect") or b"").lower() == b"100-continue":
            # boto3 waits for a 100 before sending a part's body: answer it here, forward without the Expect
            req = [line for line in req if not line.lower().startswith(b"expect:")]
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        upstream.sendall(b"".join(req) + b"\r\n")
        if targeted:
            with self._lock:
                self.puts.append(path.decode())
        if targeted and not self._take("pass_puts") and self._take("drop_puts"):
            cl = int(self._header(req, b"content-length") or b"0")
            self._relay_body(cin, upstream, req, limit=cl // 2)
            self.events.append(("drop", path.decode()))
            # SO_LINGER 0: close with a reset, so the client sees the connection die, not a clean end
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        self._relay_body(cin, upstream, req)
        resp = self._read_head(uin)
        if resp is None:
            return False
        status = int(resp[0].split(b" ")[1])
        if targeted and 200 <= status < 300 and self._take("bad_etag_puts"):
            resp = [
                b"Etag: " + BOGUS_ETAG.encode() + b"\r\n" if line.lower().startswith(b"etag:") else line
                for line in resp
            ]
            self.events.append(("bad_etag", path.decode()))
        client.sendall(b"".join(resp) + b"\r\n")
        if method != b"HEAD" and status not in (204, 304) and status >= 200:
            if self._header(resp, b"content-length") is None and self._header(resp, b"transfer-encoding") is None:
                while True:  # body delimited by connection close
                    piece = uin.read1(65536)
                    if not piece:
                        return False
                    client.sendall(piece)
            self._relay_body(uin, client, resp)
        conn_hdr = (self._header(req, b"connection") or b"") + (self._header(resp, b"connection") or b"")
        return b"close" not in conn_hdr.lower()
