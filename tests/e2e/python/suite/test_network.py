"""Sandbox networking through the unmodified SDK: internet access, allow/deny lists, domains,
live updates, and what is never reachable (the host, other sandboxes, metadata, private ranges).

The test makes its own "internet": a network namespace on this machine, routed from the host
through a veth, with HTTP servers on 203.0.113.10/.11 (public-looking), 10.99.0.10 (private)
and 169.254.169.254 (metadata), and a DNS server on 203.0.113.53 that answers `*.test` names.
Nothing leaves the machine. It needs root and `ip` on the server's machine; the domain tests
also need the server to send `.test` names to that DNS server (`soulbox serve --dns-zone
test=203.0.113.53`, or `SOULBOX_DNS_ZONES=test=203.0.113.53` in its environment, as scripts/test
does) and are skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
from e2b import Sandbox, SandboxException
from e2b.sandbox.network import ALL_TRAFFIC

ALLOWED = "203.0.113.10"
OTHER = "203.0.113.11"
DNS = "203.0.113.53"
PRIVATE = "10.99.0.10"
METADATA = "169.254.169.254"
ROUTED = ("203.0.113.0/24", "10.99.0.0/24", "169.254.169.254/32")

# Runs inside the world namespace: HTTP-ish answers on 80/443/8080 of every address, DNS on 53.
WORLD_SERVER = textwrap.dedent(
    """
    import socket, struct, threading
    NAMES = {"allowed.test": "203.0.113.10", "www.wild.test": "203.0.113.10",
             "other.test": "203.0.113.11", "rebind.test": "10.99.0.10"}
    def hello(conn):
        conn.settimeout(3)
        try:
            data = conn.recv(4096)
            host = b""
            for line in data.split(b"\\r\\n"):
                if line.lower().startswith(b"host:"):
                    host = line[5:].strip()
            local = conn.getsockname()[0].encode()
            conn.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\nhello from " + local + b" host=" + host + b"\\n")
        except OSError:
            pass
        conn.close()
    def tcp(port):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(64)
        while True:
            c, _ = s.accept()
            threading.Thread(target=hello, args=(c,), daemon=True).start()
    def dns():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("203.0.113.53", 53))
        while True:
            q, peer = s.recvfrom(1500)
            i, labels = 12, []
            while q[i]:
                labels.append(q[i + 1:i + 1 + q[i]].decode().lower()); i += 1 + q[i]
            qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
            question = q[12:i + 5]
            ip = NAMES.get(".".join(labels))
            if ip is None:
                head = q[:2] + b"\\x81\\x83" + b"\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00"
                s.sendto(head + question, peer); continue
            answers = b""
            if qtype == 1:
                answers = b"\\xc0\\x0c\\x00\\x01\\x00\\x01" + struct.pack("!IH", 300, 4) + socket.inet_aton(ip)
            head = q[:2] + b"\\x81\\x80" + struct.pack("!HHHH", 1, 1 if answers else 0, 0, 0)
            s.sendto(head + question + answers, peer)
    for p in (80, 443, 8080):
        threading.Thread(target=tcp, args=(p,), daemon=True).start()
    dns()
    """
)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def world() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the network tests need root and `ip` on the server's machine")
    name = f"sbe2e{os.getpid()}"
    for net in ROUTED:
        subprocess.run(["ip", "route", "del", net], capture_output=True)
    subprocess.run(["ip", "link", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    sh("ip", "netns", "add", name)
    server = None
    try:
        sh("ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", name)
        sh("ip", "addr", "add", "198.51.100.5/30", "dev", name)
        sh("ip", "link", "set", name, "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "addr", "add", "198.51.100.6/30", "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        for a in (ALLOWED, OTHER, DNS, PRIVATE, METADATA):
            sh("ip", "-n", name, "addr", "add", f"{a}/32", "dev", "lo")
        sh("ip", "-n", name, "route", "add", "default", "via", "198.51.100.5")
        for net in ROUTED:
            sh("ip", "route", "replace", net, "via", "198.51.100.6")
        server = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c", WORLD_SERVER],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((ALLOWED, 80), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the test world's servers did not start")
        yield name
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        for net in ROUTED:
            subprocess.run(["ip", "route", "del", net], capture_output=True)
        subprocess.run(["ip", "link", "del", name], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


PROBE = textwrap.dedent(
    """
    import socket, sys
    host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    try:
        s = socket.create_connection((host, port), timeout=3)
        s.settimeout(4)
        s.sendall(("GET / HTTP/1.0\\r\\nHost: " + name + "\\r\\n\\r\\n").encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        lines = [l for l in data.decode(errors="replace").splitlines() if l.startswith("hello")]
        print(lines[0] if lines else "EMPTY")
    except Exception as e:
        print("ERR", type(e).__name__, e)
    """
)


def probe(sbx: Sandbox, host: str, port: int = 80, name: str = "x") -> str:
    """Connects from inside the sandbox; the server's greeting, or ERR/EMPTY."""
    sbx.files.write("/tmp/probe.py", PROBE)
    r = sbx.commands.run(f"python3 /tmp/probe.py {host} {port} {name}", timeout=30)
    return r.stdout.strip()


def reachable(sbx: Sandbox, host: str, port: int = 80, name: str = "x") -> bool:
    out = probe(sbx, host, port, name)
    assert out.startswith(("hello", "ERR", "EMPTY")), out
    return out.startswith("hello")


def resolve(sbx: Sandbox, name: str) -> str | None:
    r = sbx.commands.run(
        f"python3 -c \"import socket;print(socket.gethostbyname('{name}'))\" 2>/dev/null || true",
        timeout=30,
    )
    return r.stdout.strip() or None


def own_address(sbx: Sandbox) -> str:
    r = sbx.commands.run(
        "python3 -c \"import socket;s=socket.socket(2,2);s.connect(('203.0.113.10',9));"
        "print(s.getsockname()[0])\"",
        timeout=30,
    )
    return r.stdout.strip()


def gateway(sbx: Sandbox) -> str:
    return sbx.commands.run("awk '/^nameserver/{print $2; exit}' /etc/resolv.conf").stdout.strip()


@pytest.fixture(scope="module")
def host_service() -> Iterator[int]:
    """A TCP service on every host address, like an API that listens on 0.0.0.0."""
    srv = socket.socket()
    srv.bind(("0.0.0.0", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            c.sendall(b"hello from the host\n")
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield port
    stop.set()
    t.join(timeout=5)
    srv.close()


def host_address() -> str:
    """An address of the host that is not loopback (its default-route source)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((ALLOWED, 9))
        return s.getsockname()[0]
    finally:
        s.close()


def test_default_sandbox_reaches_the_internet_and_nothing_private(
    world, make_sandbox, host_service, e2e
) -> None:
    sbx = make_sandbox()
    peer = make_sandbox()
    try:
        assert probe(sbx, ALLOWED).startswith(f"hello from {ALLOWED}")
        info = sbx.get_info()
        assert info.allow_internet_access is True
        assert not reachable(sbx, PRIVATE), "private range"
        assert not reachable(sbx, METADATA), "metadata address"
        gw = gateway(sbx)
        assert gw, "resolv.conf names the slot's resolver"
        assert not reachable(sbx, gw, host_service), "the host through the gateway"
        assert not reachable(sbx, host_address(), host_service), "the host's own address"
        api_port = int(e2e.api_url.rsplit(":", 1)[1])
        assert not reachable(sbx, "127.0.0.1", api_port), "the API on the host's loopback"
        assert not reachable(sbx, gw, api_port), "the API through the gateway"
        # Another sandbox's service, on its own address.
        peer.files.write(
            "/tmp/hello.py",
            "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 8080))\ns.listen(8)\n"
            "while True:\n    c, _ = s.accept()\n    c.recv(4096)\n    c.sendall(b'hello from the peer\\n')\n    c.close()\n",
        )
        server = peer.commands.run("python3 /tmp/hello.py", background=True)
        peer_ip = own_address(peer)
        deadline = time.monotonic() + 10
        while not reachable(peer, "127.0.0.1", 8080) and time.monotonic() < deadline:
            time.sleep(0.2)
        out = probe(sbx, peer_ip, 8080)
        assert reachable(peer, "127.0.0.1", 8080), "the peer's own service runs"
        server.kill()
        assert out.startswith("ERR"), f"another sandbox ({peer_ip}) answered: {out}"
        assert own_address(sbx) != peer_ip
    finally:
        Sandbox.kill(sbx.sandbox_id)
        Sandbox.kill(peer.sandbox_id)


def test_internet_access_off_blocks_everything(world, make_sandbox) -> None:
    sbx = make_sandbox(allow_internet_access=False)
    try:
        assert not reachable(sbx, ALLOWED)
        assert not reachable(sbx, OTHER, 443)
        assert resolve(sbx, "allowed.test") is None
        info = sbx.get_info()
        assert info.allow_internet_access is False
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_allow_and_deny_lists_by_cidr(world, make_sandbox) -> None:
    sbx = make_sandbox(network={"allow_out": [f"{ALLOWED}/32"], "deny_out": [ALL_TRAFFIC]})
    partial = make_sandbox(network={"deny_out": [OTHER]})
    lan = make_sandbox(network={"allow_out": ["10.99.0.0/24"]})
    try:
        assert reachable(sbx, ALLOWED)
        assert not reachable(sbx, OTHER)
        info = sbx.get_info()
        assert info.network is not None
        assert info.network.get("allow_out") == [f"{ALLOWED}/32"]
        assert info.network.get("deny_out") == [ALL_TRAFFIC]
        assert reachable(partial, ALLOWED)
        assert not reachable(partial, OTHER)
        assert reachable(lan, PRIVATE), "a private range named in allow_out"
        assert not reachable(lan, METADATA)
    finally:
        for s in (sbx, partial, lan):
            Sandbox.kill(s.sandbox_id)


def test_bad_network_config_is_rejected(world, make_sandbox) -> None:
    with pytest.raises(SandboxException) as err:
        make_sandbox(network={"allow_out": ["not a domain!"]})
    assert "400" in str(err.value)
    with pytest.raises(SandboxException) as err:
        make_sandbox(network={"deny_out": ["example.com"]})
    assert "400" in str(err.value)


@pytest.mark.skipif(not hasattr(Sandbox, "update_network"), reason="this SDK has no update_network")
def test_update_network_takes_effect_live(world, make_sandbox) -> None:
    sbx = make_sandbox()
    try:
        assert reachable(sbx, ALLOWED)
        sbx.update_network({"deny_out": [ALL_TRAFFIC], "allow_out": [OTHER]})
        assert not reachable(sbx, ALLOWED)
        assert reachable(sbx, OTHER)
        info = sbx.get_info()
        assert info.network is not None and info.network.get("allow_out") == [OTHER]
        sbx.update_network({"allow_internet_access": False})
        assert not reachable(sbx, OTHER)
        assert sbx.get_info().allow_internet_access is False
        # Omitted fields are cleared: back to full access.
        sbx.update_network({})
        assert reachable(sbx, ALLOWED)
        assert sbx.get_info().allow_internet_access is True
    finally:
        Sandbox.kill(sbx.sandbox_id)
    with pytest.raises(Exception) as err:
        Sandbox.update_network(sbx.sandbox_id, {"deny_out": [ALL_TRAFFIC]})
    assert "not found" in str(err.value).lower() or "404" in str(err.value)


def test_domains_in_allow_out(world, make_sandbox) -> None:
    sbx = make_sandbox(network={"allow_out": ["allowed.test", "*.wild.test"], "deny_out": [ALL_TRAFFIC]})
    try:
        if resolve(sbx, "allowed.test") != ALLOWED:
            pytest.skip(
                f"the server does not resolve through the test world's DNS ({DNS}); "
                "start it with --dns-zone test=203.0.113.53"
            )
        assert resolve(sbx, "www.wild.test") == ALLOWED
        assert resolve(sbx, "other.test") is None, "names outside allow_out do not resolve"
        assert probe(sbx, "allowed.test", 80, "allowed.test").startswith(f"hello from {ALLOWED}")
        # Hard-coded addresses: the Host/SNI decides, and an allowed name only ever reaches
        # that name's own addresses.
        assert not reachable(sbx, OTHER, 80, "other.test")
        assert probe(sbx, OTHER, 80, "allowed.test").startswith(f"hello from {ALLOWED}")
        assert not reachable(sbx, OTHER, 8080, "allowed.test"), "other ports of other addresses"
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_slots_are_reclaimed(world, make_sandbox, e2e) -> None:
    if e2e.data_dir is None:
        pytest.skip("SOULBOX_DATA_DIR is not set")
    records = e2e.data_dir / "network"

    def live_records() -> set[str]:
        return {p.stem for p in records.glob("*.json")} if records.is_dir() else set()

    made = [make_sandbox(allow_internet_access=i % 2 == 0) for i in range(6)]
    ids = {s.sandbox_id for s in made}
    assert ids <= live_records()
    for s in made:
        Sandbox.kill(s.sandbox_id)
    deadline = time.monotonic() + 10
    while live_records() & ids and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (live_records() & ids), "network records of killed sandboxes"


RAW_PROBE = textwrap.dedent(
    """
    import socket
    for name, args in (("raw", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                       ("packet", (socket.AF_PACKET, socket.SOCK_RAW, 0x0300))):
        try:
            socket.socket(*args)
            print(name, "OPENED")
        except OSError as e:
            print(name, "refused", e.errno)
    for path, value in (("/proc/sys/net/ipv4/conf/eth0/rp_filter", "0"),
                        ("/proc/sys/net/ipv4/ip_forward", "0")):
        try:
            with open(path, "w") as f:
                f.write(value)
            print(path, "WRITTEN")
        except OSError as e:
            print(path, "refused", e.errno)
    """
)


def test_sandbox_root_cannot_reconfigure_its_network(world, make_sandbox) -> None:
    sbx = make_sandbox(allow_internet_access=False)
    try:
        sbx.files.write("/tmp/raw.py", RAW_PROBE)
        out = sbx.commands.run("sudo python3 /tmp/raw.py", timeout=30).stdout
        assert "OPENED" not in out and "WRITTEN" not in out, out
        assert out.count("refused") == 4, out
        # Address changes need CAP_NET_ADMIN over the namespace, which sandbox root lacks.
        r = sbx.commands.run(
            "sudo python3 -c \"import socket,fcntl,struct;s=socket.socket();"
            "fcntl.ioctl(s, 0x8914, struct.pack('16sH14s', b'eth0', 0, b''))\" 2>&1; echo rc=$?",
            timeout=30,
        )
        assert "rc=0" not in r.stdout, r.stdout
        assert not reachable(sbx, ALLOWED)
    finally:
        Sandbox.kill(sbx.sandbox_id)
