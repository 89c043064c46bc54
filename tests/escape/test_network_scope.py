"""The resolver and the SNI/Host proxy serve a sandbox only on the host end of its own link.

Both listen on every host address (one socket each for all sandboxes); the nftables input chain
lets a sandbox reach them only through the gateway address of its own slot. Reaching them on a
neighbour's gateway would let a sandbox use another sandbox's egress identity at the resolver
(which learns addresses per slot) and proxy.
"""

from __future__ import annotations

import ipaddress
import subprocess

import pytest
from conftest import Env, check_blocked, probe, record, run

# A DNS query for `example.test` sent with a 2 s timeout; prints "answered" or the error's name.
DNS_QUERY = r"""
import socket, struct, sys
q = struct.pack(">HHHHHH", 0x5eb0, 0x0100, 1, 0, 0, 0) + b"\x07example\x04test\x00" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
try:
    s.sendto(q, (sys.argv[1], int(sys.argv[2])))
    data = s.recv(512)
    print("answered" if data[:2] == q[:2] else "garbage")
except OSError as e:
    print(type(e).__name__)
"""


def server_ports(env: Env) -> tuple[set[int], set[int]]:
    """The server's listening TCP ports and bound UDP ports other than the API's and gateway's."""
    out = subprocess.run(["ss", "-Hlntup"], capture_output=True, text=True, check=True).stdout
    tcp: set[int] = set()
    udp: set[int] = set()
    for line in out.splitlines():
        if f"pid={env.server_pid}," not in line:
            continue
        fields = line.split()
        port = int(fields[4].rsplit(":", 1)[1])
        (tcp if fields[0] == "tcp" else udp).add(port)
    return tcp - {env.api_port, env.gateway_port}, udp


def gateway_of(address: str) -> str:
    """The host end of the /30 link whose sandbox end is `address`."""
    return str(ipaddress.IPv4Address(address) - 1)


@pytest.mark.parametrize("who", ("user", "root"))
def test_resolver_and_proxy_only_on_own_link(attacker, env, neighbour, who):
    tcp, udp = server_ports(env)
    assert tcp and udp, f"no resolver/proxy sockets found for server pid {env.server_pid}"
    assert neighbour.address, "the neighbour has no address"
    theirs = gateway_of(neighbour.address)
    attacker.files.write("/tmp/dnsq.py", DNS_QUERY)

    # Control: on the attacker's own gateway the resolver answers and the proxy accepts.
    own = probe(attacker, "connect", who, {"targets": [], "gateway_ports": sorted(tcp)})
    own_gw = own["data"]["gateway"]
    assert own_gw and own_gw != theirs
    assert any(r == "ok" for r in own["steps"].values()), f"nothing answers on the own gateway: {own}"
    answered = {p: run(attacker, f"python3 /tmp/dnsq.py {own_gw} {p}", who).stdout.strip() for p in udp}
    assert "answered" in answered.values(), f"the resolver does not answer on the own gateway: {answered}"

    # Attack: the same ports on the neighbour's gateway.
    r = probe(attacker, "connect", who, {"targets": [[theirs, p] for p in sorted(tcp)]})
    check_blocked("reach the resolver/proxy (TCP) on a neighbour's gateway", who, r, f"neighbour gateway {theirs}")
    udp_results = {p: run(attacker, f"python3 /tmp/dnsq.py {theirs} {p}", who).stdout.strip() for p in udp}
    problems = [f"udp {theirs}:{p} answered" for p, out in udp_results.items() if out == "answered"]
    record("query the resolver (UDP) on a neighbour's gateway", who, problems, f"{len(udp)} ports: {udp_results}")
