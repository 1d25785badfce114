"""The dev cluster's ports and readiness probe (no services started: the cluster itself is
``test_cluster.py``'s)."""

from __future__ import annotations

import socket
import threading

from xray_match import devcluster


def test_ports_lie_below_the_ephemeral_range_and_never_repeat():
    # a port in the ephemeral range can be taken by any process binding port 0 (a Ray node's raylet)
    # between the draw and the server's bind: the cluster's MLflow port once went to a Ray gRPC server
    floor = devcluster._ephemeral_floor()
    ports = devcluster.distinct_ports(devcluster.CLUSTER_PORTS)
    spanned = [ports[k] for k in ("s3", "weed_master", "weed_volume", "weed_filer")]
    taken = list(ports.values()) + [p + 10000 for p in spanned]
    assert len(set(taken)) == len(taken) == 13
    assert all(devcluster.PORT_FLOOR <= p < floor for p in taken)
    avoid = set(taken)
    assert all(devcluster.free_port(0, avoid) not in avoid for _ in range(50))


def test_a_port_in_use_is_not_handed_out():
    with socket.socket() as s:
        s.bind(("127.0.0.1", devcluster.free_port()))
        held = s.getsockname()[1]
        assert not devcluster._port_free(held)


def test_readiness_probe_reads_another_protocol_on_the_port_as_not_ready():
    # what the MLflow probe met: an HTTP/2 (gRPC) server answering an HTTP/1.1 request
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x05\x00\x00@\x00\r\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        assert devcluster._http_status(f"http://127.0.0.1:{server.getsockname()[1]}/health") == 0
    finally:
        t.join(timeout=10)
        server.close()
