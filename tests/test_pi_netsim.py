"""The userspace relay that emulates a WAN for two-process secure inference."""

import socket
import threading
import time

from piformer.pi.netsim import DelayRelay


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        while data := conn.recv(1 << 16):
            conn.sendall(data)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _round_trip(port: int, payload: bytes) -> float:
    with socket.create_connection(("127.0.0.1", port)) as c:
        t0 = time.perf_counter()
        c.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += c.recv(1 << 16)
        assert got == payload
        return time.perf_counter() - t0


def test_delay_is_added_each_way():
    srv, port = _echo_server()
    relay = DelayRelay(0, ("127.0.0.1", port), delay_s=0.05).start()
    try:
        rtt = _round_trip(relay.port, b"ping")
    finally:
        relay.stop()
        srv.close()
    assert 0.1 <= rtt < 0.5  # 50 ms there, 50 ms back


def test_bandwidth_is_capped():
    srv, port = _echo_server()
    relay = DelayRelay(0, ("127.0.0.1", port), delay_s=0.0, bandwidth_bps=8e6).start()  # 1 MB/s
    try:
        rtt = _round_trip(relay.port, b"x" * 200_000)  # 0.2 s each way at 1 MB/s; the echo pipelines
    finally:
        relay.stop()
        srv.close()
    assert 0.2 <= rtt < 2.0
