"""A fault-injecting TCP proxy for the sync tests (not product code): resets, dropped and cut
answers, 503s, hangs and outages between an appliance and a real HQ on loopback."""
from __future__ import annotations

import collections
import random
import select
import socket
import struct
import threading


def _rst(sock: socket.socket) -> None:
    """Close with a TCP reset instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _read_request(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return data


class FaultProxy:
    """A loopback TCP proxy in front of HQ. Each connection gets a fate, drawn from a seeded
    generator by its sequence number (reproducible):
      reset  - RST at once (connection reset by peer)
      drop   - forward the request, let HQ answer (and commit), then RST before any answer byte
      cut    - forward, then close after a few thousand answer bytes (a download breaks midway)
      busy   - answer 503 with Retry-After: 3 without asking HQ
      hang   - read the request, never answer (the client's read timeout fires)
      outage - every connection in the window [start, end) is reset
      pass   - relay both ways
    """

    def __init__(self, upstream_port: int, *, seed: int = 7, reset=0.0, drop=0.0, cut=0.0, busy=0.0, hang=0.0,
                 outage=(0, 0), cut_bytes=(1500, 6000), drop_first: tuple[str, ...] = ()):
        self.upstream = upstream_port
        self.seed, self.outage, self.cut_bytes = seed, outage, cut_bytes
        self.odds = [("reset", reset), ("drop", drop), ("cut", cut), ("busy", busy), ("hang", hang)]
        self.fates: collections.Counter = collections.Counter()
        self.range_requests = 0
        self.count = 0
        self.seen: list[tuple[str, str]] = []      # (fate, request line) of relayed requests
        self.drop_first = list(drop_first)           # request-line prefixes: drop the first such answer
        self._lock, self._stop = threading.Lock(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def fate(self, n: int) -> tuple[str, random.Random]:
        rng = random.Random(f"{self.seed}-{n}")
        if self.outage[0] <= n < self.outage[1]:
            return "outage", rng
        x = rng.random()
        for name, p in self.odds:
            if x < p:
                return name, rng
            x -= p
        return "pass", rng

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                n, self.count = self.count, self.count + 1
            fate, rng = self.fate(n)
            self.fates[fate] += 1
            t = threading.Thread(target=self._handle, args=(conn, fate, rng), daemon=True)
            self._threads.append(t)
            t.start()

    def _handle(self, conn: socket.socket, fate: str, rng: random.Random) -> None:
        try:
            if fate in ("reset", "outage"):
                return _rst(conn)
            if fate == "busy":
                _read_request(conn)
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                conn.shutdown(socket.SHUT_WR)
                return conn.close()
            if fate == "hang":
                _read_request(conn)
                select.select([conn], [], [], 10)         # until the client gives up
                return conn.close()
            limit = {"drop": 0, "cut": rng.randint(*self.cut_bytes)}.get(fate)
            self._relay(conn, limit, fate)
        except OSError:
            conn.close()

    def _relay(self, client: socket.socket, limit: int | None, fate: str) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        down = 0
        try:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 10)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        with self._lock:
                            if data[:8].split(b" ")[0] in (b"GET", b"HEAD", b"PUT", b"POST"):
                                line = data.split(b"\r\n", 1)[0].decode()
                                for prefix in [p for p in self.drop_first if line.startswith(p)][:1]:
                                    self.drop_first.remove(prefix)
                                    fate, limit = "drop", 0
                                self.seen.append((fate, line))
                            if b"\r\nrange: bytes=" in data.lower():
                                self.range_requests += 1
                        upstream.sendall(data)
                        continue
                    if limit is not None and down + len(data) > limit:
                        if not limit:
                            return _rst(client)           # drop: nothing of the answer arrives
                        client.sendall(data[:limit - down])
                        return client.shutdown(socket.SHUT_RDWR)   # cut: FIN (a RST would discard the bytes)
                    client.sendall(data)
                    down += len(data)
        finally:
            upstream.close()
            client.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for t in self._threads:
            t.join(timeout=2)
