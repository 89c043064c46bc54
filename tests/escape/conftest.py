"""The escape battery's harness: the server under test, the host's state, the sandboxes, the table.

Every attack runs inside a real sandbox of a real `soulbox serve` (tests/escape/run starts one),
driven by the unmodified E2B Python SDK. The host side (this process, root on the server's
machine) plants things an escape would reach — a secret file, a process, a TCP listener on all
addresses, an abstract unix socket, a marker in the server's environment — and checks after
every test that the host is unchanged: files, hostname, clock, mounts, sysctls, kernel state,
cgroup release agents, processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2b import CommandExitException, Sandbox

PROBES = Path(__file__).with_name("probes.py")
PROBES_IN_SANDBOX = "/opt/escape/probes.py"
WHO = ("user", "root", "sudo")
# A template row with the base layers and small limits, for the disk/inode/memory attacks (the
# base template's 10 GiB would take minutes to fill). Registered directly in the store's
# `templates` table, the one for rootfs-path templates.
SMALL_TEMPLATE = "escape-small"
SMALL_DISK_MB = 48
SMALL_MEMORY_MB = 256


# --------------------------------------------------------------------------- configuration


@dataclass
class Env:
    api_url: str
    sandbox_url: str
    api_key: str
    data_dir: Path
    server_pid: int
    marker: str
    run_id: str = field(default_factory=lambda: f"esc{int(time.time())}")

    @property
    def api_port(self) -> int:
        return int(self.api_url.rsplit(":", 1)[1])

    @property
    def gateway_port(self) -> int:
        return int(self.sandbox_url.rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def env() -> Env:
    missing = [
        n
        for n in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "SOULBOX_DATA_DIR", "SOULBOX_SERVER_PID")
        if not os.environ.get(n)
    ]
    if missing:
        pytest.exit(f"{', '.join(missing)} not set: run tests/escape/run", returncode=2)
    if os.geteuid() != 0:
        pytest.exit("the escape battery checks host state: run it as root", returncode=2)
    return Env(
        api_url=os.environ["E2B_API_URL"].rstrip("/"),
        sandbox_url=os.environ["E2B_SANDBOX_URL"].rstrip("/"),
        api_key=os.environ["E2B_API_KEY"],
        data_dir=Path(os.environ["SOULBOX_DATA_DIR"]),
        server_pid=int(os.environ["SOULBOX_SERVER_PID"]),
        marker=os.environ.get("SOULBOX_ESCAPE_MARKER", ""),
    )


# --------------------------------------------------------------------------- the outcome table


@dataclass
class Outcome:
    attack: str
    who: str
    verdict: str
    detail: str


class Table:
    """Attacks and their outcomes, printed at the end of the run."""

    def __init__(self) -> None:
        self.rows: list[Outcome] = []
        self._lock = threading.Lock()

    def add(self, attack: str, who: str, escaped: list[str], detail: str) -> None:
        verdict = "ESCAPED" if escaped else "blocked"
        if escaped:
            detail = "; ".join(escaped) + (f" | {detail}" if detail else "")
        with self._lock:
            self.rows.append(Outcome(attack, who, verdict, detail))


TABLE = Table()


@pytest.fixture(scope="session")
def table() -> Table:
    return TABLE


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not TABLE.rows:
        return
    tr = terminalreporter
    tr.section(f"escape battery: {len(TABLE.rows)} attack runs")
    width = max(len(r.attack) for r in TABLE.rows)
    for r in TABLE.rows:
        detail = r.detail if len(r.detail) < 150 else r.detail[:147] + "..."
        tr.write_line(f"{r.verdict:8} {r.attack:<{width}}  as {r.who:5}  {detail}")
    escaped = [r for r in TABLE.rows if r.verdict != "blocked"]
    attacks = {r.attack for r in TABLE.rows}
    tr.write_line(f"{len(attacks)} distinct attacks, {len(TABLE.rows)} runs, {len(escaped)} escaped")


def summarize(steps: dict[str, str]) -> str:
    """'12 attempts: EPERM x10, ENOENT x2' for the table."""
    counts: dict[str, int] = {}
    for result in steps.values():
        counts[result] = counts.get(result, 0) + 1
    parts = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{len(steps)} attempts: {parts}"


def check_blocked(attack: str, who: str, result: dict, extra: str = "") -> None:
    """Records the attack; fails the test if any step went through."""
    steps = result["steps"]
    escaped = [f"{step}: went through" for step, r in steps.items() if r == "ok"]
    TABLE.add(attack, who, escaped, (summarize(steps) + (f"; {extra}" if extra else "")) if steps else extra)
    assert not escaped, f"{attack} as {who}: {escaped}\n{json.dumps(result, indent=1)[:4000]}"


def record(attack: str, who: str, problems: list[str], detail: str) -> None:
    """Records an attack whose checks are done by the test; fails it on problems."""
    TABLE.add(attack, who, problems, detail)
    assert not problems, f"{attack} as {who}: {problems}"


# --------------------------------------------------------------------------- running probes


def run(sbx: Sandbox, cmd: str, who: str = "user", timeout: float | None = None, **kw):
    """commands.run as `user`, `root`, or `user` through `sudo -n`; never raises on exit codes.
    The timeout bounds the process's life: none for background processes, else 120 s."""
    if timeout is None:
        timeout = 0 if kw.get("background") else 120
    if who == "sudo":
        cmd = f"sudo -n sh -c {shlex.quote(cmd)}"
    try:
        return sbx.commands.run(cmd, user="root" if who == "root" else "user", timeout=timeout, **kw)
    except CommandExitException as e:
        return e


def probe(sbx: Sandbox, name: str, who: str, args: dict | None = None, timeout: float = 180) -> dict:
    cmd = f"python3 {PROBES_IN_SANDBOX} {name} {json.dumps(args or {}).encode().hex()}"
    r = run(sbx, cmd, who, timeout=timeout)
    try:
        out = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"probe {name} as {who} gave no result (exit {r.exit_code}): {r.stderr[-3000:]}") from None
    expected_uid = 1000 if who == "user" else 0
    assert out["who"]["euid"] == expected_uid, f"probe ran as {out['who']}, wanted {who}"
    return out


def install_probes(sbx: Sandbox) -> None:
    sbx.files.write(PROBES_IN_SANDBOX, PROBES.read_text())
    run(sbx, f"chmod 755 /opt/escape && chmod 644 {PROBES_IN_SANDBOX}", "root")


# --------------------------------------------------------------------------- sandboxes


class Sandboxes:
    """Every sandbox the run makes, killed at the end whatever happens."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.ids: set[str] = set()

    def make(self, template: str | None = None, **kw) -> Sandbox:
        kw.setdefault("timeout", 1800)
        kw.setdefault("metadata", {"escape-run": self.env.run_id})
        sbx = Sandbox.create(template, **kw) if template else Sandbox.create(**kw)
        self.ids.add(sbx.sandbox_id)
        install_probes(sbx)
        return sbx

    def kill(self, sbx: Sandbox) -> None:
        Sandbox.kill(sbx.sandbox_id)
        self.ids.discard(sbx.sandbox_id)

    def kill_all(self) -> None:
        for sid in sorted(self.ids):
            try:
                Sandbox.kill(sid)
            except Exception:
                pass


@pytest.fixture(scope="session")
def sandboxes(env: Env) -> Iterator[Sandboxes]:
    s = Sandboxes(env)
    yield s
    s.kill_all()


@pytest.fixture(scope="session")
def small_template(env: Env, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Builds `escape-small` as a user would: `FROM base` with SMALL_DISK_MB and SMALL_MEMORY_MB
    (no steps, so no layers of its own: the build takes a moment)."""
    ctx = tmp_path_factory.mktemp("escape-small")
    (ctx / "Dockerfile").write_text(
        f"FROM base\nLABEL soulbox.memory-mb={SMALL_MEMORY_MB} soulbox.disk-mb={SMALL_DISK_MB}\n"
    )
    out = subprocess.run(
        [str(env.data_dir / "bin/soulbox"), "template", "build", "--name", SMALL_TEMPLATE, str(ctx)],
        env={**os.environ, "E2B_API_URL": env.api_url, "E2B_API_KEY": env.api_key},
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return SMALL_TEMPLATE


@pytest.fixture(scope="session")
def attacker(sandboxes: Sandboxes) -> Sandbox:
    """The sandbox most attacks run in (non-destructive ones)."""
    return sandboxes.make()


@pytest.fixture(scope="session")
def canary(sandboxes: Sandboxes) -> Sandbox:
    """A bystander that must keep working through everything; checked at the end."""
    sbx = sandboxes.make(metadata={"escape-role": "canary"})
    sbx.files.write("/home/user/canary.txt", "still here")
    run(sbx, "exec -a canary-sleeper sleep 86400", background=True)
    return sbx


@dataclass
class Neighbour:
    """Another tenant's sandbox with things planted for the attacker to look for."""

    sbx: Sandbox
    marker: str
    ipc_key: int
    abstract: str
    tcp_port: int
    address: str


@pytest.fixture(scope="session")
def neighbour(sandboxes: Sandboxes, canary: Sandbox) -> Neighbour:
    sbx = sandboxes.make(metadata={"escape-role": "neighbour"})
    marker = f"neighbour-secret-{secrets.token_hex(6)}"
    key = 0x5EC0000 + secrets.randbelow(0xFFFF)
    abstract = f"escape-{marker}"
    port = 18000 + secrets.randbelow(1000)
    sbx.files.write(f"/home/user/{marker}", marker)
    sbx.files.write(f"/tmp/{marker}", marker)
    run(sbx, f"exec -a proc-{marker} sleep 86400", background=True)
    # A TCP server on every address and an abstract unix socket, both answering the marker.
    server = (
        "import socket, threading\n"
        "def serve(s):\n"
        "    while True:\n"
        "        c, _ = s.accept(); c.sendall(b'" + marker + "'); c.close()\n"
        f"t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(('0.0.0.0', {port})); t.listen()\n"
        f"u = socket.socket(socket.AF_UNIX); u.bind('\\0{abstract}'); u.listen()\n"
        "threading.Thread(target=serve, args=(u,), daemon=True).start()\n"
        "serve(t)\n"
    )
    sbx.files.write("/home/user/serve.py", server)
    run(sbx, "exec python3 /home/user/serve.py", background=True)
    planted = probe(sbx, "ipc", "user", {"key": key, "plant": True})
    assert all(v == "ok" for v in planted["steps"].values()), planted
    address = run(sbx, "hostname -I 2>/dev/null || true").stdout.split()
    # Wait until its server answers inside its own sandbox.
    for _ in range(50):
        if marker in run(sbx, f"python3 -c \"import socket; print(socket.create_connection(('127.0.0.1', {port}), 1).recv(100))\"").stdout:
            break
        time.sleep(0.1)
    return Neighbour(sbx, marker, key, abstract, port, address[0] if address else "")


# --------------------------------------------------------------------------- host-side plants


@dataclass
class HostPlants:
    victim_dir: Path
    victim_file: Path
    secret: str
    victim_pid: int
    victim_name: str
    tcp_port: int
    abstract: str
    addresses: list[str]
    disk: tuple[int, int]


def _host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    addrs = []
    for link in json.loads(out):
        for a in link.get("addr_info", []):
            if a.get("scope") != "host" and a.get("family") == "inet":
                addrs.append(a["local"])
    return addrs


@pytest.fixture(scope="session")
def plants(env: Env) -> Iterator[HostPlants]:
    secret = f"host-secret-{secrets.token_hex(8)}"
    victim_dir = Path(f"/var/lib/soulbox-escape-victim-{os.getpid()}")
    victim_dir.mkdir(mode=0o755, exist_ok=True)
    victim_file = victim_dir / "secret.txt"
    victim_file.write_text(secret + "\n")
    victim_file.chmod(0o644)
    name = f"escape-host-victim-{secrets.token_hex(4)}"
    victim = subprocess.Popen(["bash", "-c", f"exec -a {name} sleep 86400"], start_new_session=True)
    # A TCP listener on every host address and an abstract unix socket in the host's netns:
    # nothing in a sandbox may connect to either.
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", 0))
    tcp.listen(64)
    abstract = f"escape-host-{secrets.token_hex(6)}"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind("\0" + abstract)
    unix.listen(64)
    accepted: list[str] = []

    def serve(s: socket.socket, label: str) -> None:
        while True:
            try:
                c, peer = s.accept()
            except OSError:
                return
            accepted.append(f"{label} from {peer}")
            c.close()

    for s, label in ((tcp, "tcp"), (unix, "abstract")):
        threading.Thread(target=serve, args=(s, label), daemon=True).start()
    st = os.stat(subprocess.run(["findmnt", "-no", "SOURCE", "/"], capture_output=True, text=True).stdout.strip() or "/")
    disk = (os.major(st.st_rdev), os.minor(st.st_rdev)) if st.st_rdev else (8, 0)
    yield HostPlants(
        victim_dir, victim_file, secret, victim.pid, name, tcp.getsockname()[1], abstract, _host_addresses(), disk
    )
    tcp.close()
    unix.close()
    victim.kill()
    victim.wait()
    victim_file.unlink(missing_ok=True)
    victim_dir.rmdir()
    assert not accepted, f"something connected to the host's planted listeners: {accepted}"


# --------------------------------------------------------------------------- host state


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _sha(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


SYSCTLS = (
    "kernel/core_pattern", "kernel/hostname", "kernel/domainname", "kernel/randomize_va_space",
    "kernel/panic", "kernel/shmmax", "kernel/tainted", "kernel/unprivileged_bpf_disabled",
    "kernel/perf_event_paranoid", "kernel/kptr_restrict", "kernel/dmesg_restrict",
    "kernel/modprobe", "kernel/sysrq", "vm/overcommit_memory", "fs/file-max",
    "user/max_user_namespaces", "net/ipv4/ip_unprivileged_port_start",
)
# Mounts other work on this machine makes and removes (other servers, tests, network slots).
VOLATILE_MOUNTS = ("/tmp/", "/var/lib/soulbox", "/run/", "/proc/sys/fs/binfmt_misc")


def start_time(pid: int) -> str | None:
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


def _proc_state(pid: int) -> str | None:
    status = _read(f"/proc/{pid}/status") or ""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if not fields:
        return None
    stopped = fields.get("State", "").strip()[:1] in ("T", "t")
    return f"{'stopped' if stopped else 'running'}, tracer {fields.get('TracerPid', '').strip()}"


def host_state(env: Env, plants: HostPlants) -> dict:
    mounts = set()
    for line in (_read("/proc/1/mountinfo") or "").splitlines():
        parts = line.split()
        target = parts[4]
        fstype = parts[parts.index("-") + 1]
        if not target.startswith(VOLATILE_MOUNTS):
            mounts.add(f"{target} {fstype}")
    release_agents = {}
    for d in Path("/sys/fs/cgroup").iterdir():
        if (d / "release_agent").exists():
            release_agents[d.name] = _read(d / "release_agent")
    return {
        "hostname": socket.gethostname(),
        "files": {
            p: _sha(p)
            for p in ("/etc/shadow", "/etc/passwd", "/etc/hostname", "/etc/hosts", "/etc/sudoers",
                      str(plants.victim_file), str(env.data_dir / "bin" / "soulbox"))
        },
        "sysctls": {s: _read(f"/proc/sys/{s}") for s in SYSCTLS},
        "modules": _read("/proc/modules"),
        "kexec_loaded": _read("/sys/kernel/kexec_loaded"),
        "swaps": _read("/proc/swaps"),
        "mounts": mounts,
        "release_agents": release_agents,
        "processes": {
            "server": (start_time(env.server_pid), _proc_state(env.server_pid)),
            "victim": (start_time(plants.victim_pid), _proc_state(plants.victim_pid)),
            "init": (start_time(1), _proc_state(1)),
        },
        # Realtime minus monotonic: changes only if someone sets the clock.
        "clock_offset": time.clock_gettime(time.CLOCK_REALTIME) - time.clock_gettime(time.CLOCK_MONOTONIC),
    }


def host_differences(before: dict, after: dict) -> list[str]:
    diffs = []
    for key in before:
        if key == "clock_offset":
            if abs(after[key] - before[key]) > 1.0:
                diffs.append(f"host clock moved by {after[key] - before[key]:.3f} s")
        elif key == "mounts":
            for m in sorted(before[key] - after[key]):
                diffs.append(f"host mount gone: {m}")
            for m in sorted(after[key] - before[key]):
                diffs.append(f"host mount appeared: {m}")
        elif before[key] != after[key]:
            diffs.append(f"host {key} changed: {before[key]} -> {after[key]}")
    return diffs


@pytest.fixture(scope="session")
def baseline(env: Env, plants: HostPlants) -> dict:
    return host_state(env, plants)


@pytest.fixture(autouse=True)
def host_unchanged(request, env: Env, plants: HostPlants, baseline: dict) -> Iterator[None]:
    """After every test: the host is as it was when the run started."""
    yield
    diffs = host_differences(baseline, host_state(env, plants))
    assert not diffs, f"{request.node.name} changed the host: {diffs}"


# --------------------------------------------------------------------------- helpers for tests


def sandbox_row(env: Env, sandbox_id: str) -> dict:
    """The runtime handle core stored for a sandbox (host pid of its PID 1, uid range, socket)."""
    db = sqlite3.connect(f"file:{env.data_dir / 'soulbox.db'}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT handle FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
    finally:
        db.close()
    assert row, f"no row for {sandbox_id}"
    return json.loads(row[0])


def rss_kb(pid: int) -> int:
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def api_health_ms(env: Env) -> float:
    import http.client

    t = time.monotonic()
    c = http.client.HTTPConnection("127.0.0.1", env.api_port, timeout=60)
    try:
        c.request("GET", "/health")
        assert c.getresponse().status == 200
    finally:
        c.close()
    return (time.monotonic() - t) * 1000


class Responsiveness:
    """Polls the API and a canary command in the background while an attack runs."""

    def __init__(self, env: Env, canary: Sandbox) -> None:
        self.env, self.canary = env, canary
        self.api_ms: list[float] = []
        self.canary_ms: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.api_ms.append(api_health_ms(self.env))
                t = time.monotonic()
                out = self.canary.commands.run("echo alive", timeout=60).stdout
                self.canary_ms.append((time.monotonic() - t) * 1000)
                if out.strip() != "alive":
                    self.errors.append(f"canary said {out!r}")
            except Exception as e:
                self.errors.append(f"{type(e).__name__}: {e}"[:200])
            self._stop.wait(0.5)

    def __enter__(self) -> Responsiveness:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=90)

    def summary(self) -> str:
        def stats(xs: list[float]) -> str:
            return f"max {max(xs):.0f} ms over {len(xs)}" if xs else "no samples"

        return f"API /health {stats(self.api_ms)}, canary command {stats(self.canary_ms)}"

    def problems(self, limit_ms: float = 15000) -> list[str]:
        out = list(self.errors)
        if not self.api_ms or not self.canary_ms:
            out.append("no responsiveness samples")
        if self.api_ms and max(self.api_ms) > limit_ms:
            out.append(f"API answered /health only after {max(self.api_ms):.0f} ms")
        if self.canary_ms and max(self.canary_ms) > limit_ms:
            out.append(f"canary answered only after {max(self.canary_ms):.0f} ms")
        return out


@pytest.fixture
def responsiveness(env: Env, canary: Sandbox) -> Callable[[], Responsiveness]:
    return lambda: Responsiveness(env, canary)
