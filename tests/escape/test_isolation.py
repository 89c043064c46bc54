"""Sandbox ↔ host and sandbox ↔ sandbox: files, processes, namespaces, sockets, IPC, network,
the agent's binary and socket. Every attack runs inside a sandbox; the host side checks what a
success would have shown (the host's secret, its processes, its namespaces)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from e2b import Sandbox

from conftest import PROBES_IN_SANDBOX, WHO, check_blocked, probe, record, run, sandbox_row, start_time


def host_ns_inodes(*pids: int | str) -> dict[str, set[int]]:
    """Namespace inodes of host processes (those this process may inspect)."""
    out: dict[str, set[int]] = {}
    for pid in pids:
        try:
            entries = list(Path(f"/proc/{pid}/ns").iterdir())
            for entry in entries:
                out.setdefault(entry.name, set()).add(entry.stat().st_ino)
        except OSError:
            continue
    return out


@pytest.mark.parametrize("who", WHO)
def test_read_host_shadow(attacker, who):
    """Read /etc/shadow: as user it is refused; as root it is the sandbox's own, not the host's."""
    r = probe(attacker, "read_shadow", who)
    host = Path("/etc/shadow").read_bytes()
    host_users = {ln.split(b":", 1)[0].decode() for ln in host.splitlines() if ln}
    problems, data = [], r["data"]
    if data["read"] == "ok":
        if data["sha256"] == hashlib.sha256(host).hexdigest():
            problems.append("read the host's /etc/shadow")
        extra = host_users - set(data["users"]) - {"user"}
        seen = f"the sandbox's own (users: {len(data['users'])}, host-only users absent: {sorted(extra)[:3]})"
        if data["first_line"] in host.decode(errors="replace").splitlines() and "user" not in data["users"]:
            problems.append("content matches the host's")
    else:
        seen = f"refused ({data['read']})"
    record("read the host's /etc/shadow", who, problems, seen)


@pytest.mark.parametrize("who", WHO)
def test_host_paths_through_proc_root_and_cwd(attacker, plants, who):
    r = probe(attacker, "proc_root_walk", who, {"victim": str(plants.victim_file)})
    leaked = [p for p, text in r["data"]["found"] if plants.secret in text]
    problems = [f"read the host's secret through {p}" for p in leaked]
    record(
        "a host path through /proc/*/root and /proc/*/cwd (and .. above them)",
        who,
        problems,
        f"{len(r['data']['root_listings'])} distinct roots seen, all the sandbox's; host file not found",
    )


@pytest.mark.parametrize("who", WHO)
def test_host_environment(attacker, env, who):
    """/proc/1/environ and every /proc/*/environ: the server's environment never shows."""
    assert env.marker, "SOULBOX_ESCAPE_MARKER not set: the server was not started by tests/escape/run"
    server_env = Path(f"/proc/{env.server_pid}/environ").read_bytes()
    assert env.marker.encode() in server_env, "the marker is not in the server's environment"
    r = probe(attacker, "host_environ", who, {"marker": env.marker})
    pid1 = r["data"]["pid1_environ"]
    problems = [k for k, v in r["steps"].items() if v == "ok"]
    if env.marker in pid1:
        problems.append("PID 1's environment has the server's marker")
    record("the host's /proc/1/environ (server environment)", who, problems, f"sandbox PID 1 environ: {pid1.strip()[:80] or '(unreadable)'}")


@pytest.mark.parametrize("who", ("user", "root"))
def test_namespaces_are_not_the_hosts(attacker, env, who):
    """No namespace visible inside (any process, any kind) is one of the host's or the server's,
    except the time namespace, which sandboxes share with the host (clock changes are refused)."""
    r = probe(attacker, "ns_inodes", who)
    host = host_ns_inodes(1, "self", env.server_pid)
    assert host.get("net"), "cannot read the host's namespaces"
    problems = []
    for kind, inodes in r["data"]["inodes"].items():
        if kind.startswith("time"):
            continue
        for ino in inodes:
            if ino in host.get(kind, set()):
                problems.append(f"{kind} namespace {ino} is the host's")
    record("see or hold a host namespace", who, problems, f"kinds seen: {sorted(r['data']['inodes'])}; time ns shared (by design)")


@pytest.mark.parametrize("who", WHO)
def test_host_processes_invisible(attacker, env, plants, who):
    r = probe(
        attacker,
        "processes",
        who,
        {"markers": [plants.victim_name, "soulbox serve"], "host_pids": [plants.victim_pid, env.server_pid]},
    )
    check_blocked("see host processes (/proc, ps)", who, r, f"{r['data']['count']} processes visible")
    assert r["data"]["count"] < 30, r["data"]["procs"]


@pytest.mark.parametrize("who", WHO)
def test_signal_and_ptrace_host_processes(attacker, env, plants, who):
    """kill -0/-9, PTRACE_ATTACH, pidfd_open and process_vm_readv on host pids (which do not
    exist in the sandbox's pid namespace); the host victim and server stay alive (checked after
    every test)."""
    r = probe(attacker, "signal_host", who, {"host_pids": [plants.victim_pid, env.server_pid]})
    check_blocked("signal / ptrace / pidfd_open / process_vm_readv a host process", who, r)


def test_kill_everything_inside(sandboxes, canary, plants, env):
    """kill -9 -1 as sandbox root: kills the sandbox's own processes only; host processes and
    other sandboxes live on, and the sandbox's PID 1 (protected in its pid namespace) answers."""
    sbx = sandboxes.make()
    run(sbx, "sleep 600", background=True)
    r = probe(sbx, "signal_host", "root", {"host_pids": [plants.victim_pid, env.server_pid], "kill_all": True})
    problems = [k for k, v in r["steps"].items() if v == "ok"]
    alive = run(sbx, "echo alive").stdout.strip()
    if alive != "alive":
        problems.append(f"the sandbox stopped answering: {alive!r}")
    if run(canary, "echo alive").stdout.strip() != "alive":
        problems.append("the canary stopped answering")
    record("kill -9 -1 and kill -9 <host pids> as sandbox root", "root", problems, "only the sandbox's own processes died")
    sandboxes.kill(sbx)


@pytest.mark.parametrize("who", ("user",))
def test_ptrace_agent_as_user(attacker, who):
    check_blocked("ptrace the agent (PID 1) as user", who, probe(attacker, "ptrace_agent", who))


def test_ptrace_agent_as_root_is_confined(sandboxes, canary, env):
    """Sandbox root may ptrace its own agent (it owns the sandbox; the agent holds nothing of the
    host's). Stopping it that way only breaks that sandbox: the API still kills it at once and
    the other sandboxes carry on."""
    sbx = sandboxes.make()
    row = sandbox_row(env, sbx.sandbox_id)
    status = Path(f"/proc/{row['pid']}/status")
    # In the background: once the agent is stopped, nothing inside answers any more.
    sbx.commands.run(f"python3 {PROBES_IN_SANDBOX} ptrace_agent '{{}}'", user="root", background=True)
    stopped = False
    for _ in range(100):
        if "State:\tt" in status.read_text() or "State:\tT" in status.read_text():
            stopped = True
            break
        time.sleep(0.1)
    problems = []
    if run(canary, "echo alive").stdout.strip() != "alive":
        problems.append("the canary stopped answering")
    t = time.monotonic()
    sandboxes.kill(sbx)
    kill_s = time.monotonic() - t
    if start_time(row["pid"]) == str(row["start_time"]):
        problems.append("the stopped sandbox survived kill")
    record(
        "ptrace/stop the sandbox's own agent as root (self-DoS)",
        "root",
        problems,
        f"agent stopped: {stopped}; API kill took {kill_s:.2f} s; canary fine",
    )


# --------------------------------------------------------------------------- other sandboxes


@pytest.mark.parametrize("who", WHO)
def test_other_sandboxes_processes(attacker, neighbour, who):
    r = probe(attacker, "processes", who, {"markers": [f"proc-{neighbour.marker}", neighbour.marker]})
    check_blocked("see another sandbox's processes", who, r)


@pytest.mark.parametrize("who", ("user", "root"))
def test_other_sandboxes_files(attacker, neighbour, who):
    r = probe(attacker, "find_files", who, {"names": [neighbour.marker, neighbour.sbx.sandbox_id]}, timeout=300)
    check_blocked("find another sandbox's files (walk the whole filesystem)", who, r)


@pytest.mark.parametrize("who", ("user", "root"))
def test_other_sandboxes_ipc(attacker, neighbour, who):
    r = probe(attacker, "ipc", who, {"key": neighbour.ipc_key})
    check_blocked("another sandbox's SysV IPC (shm, msg, sem by key; /proc/sysvipc)", who, r)


@pytest.mark.parametrize("who", ("user", "root"))
def test_other_sandboxes_and_host_abstract_sockets(attacker, neighbour, plants, who):
    r = probe(attacker, "abstract_sockets", who, {"names": [neighbour.abstract, plants.abstract]})
    leaked = [n for n in r["data"]["listed"] if neighbour.abstract in n or plants.abstract in n]
    check_blocked("connect to another sandbox's / the host's abstract unix socket", who, r, f"listed: {len(r['data']['listed'])}")
    assert not leaked, leaked


def test_neighbour_still_serves_itself(neighbour):
    """The neighbour's planted services are real (so the attacks above had something to find)."""
    port = neighbour.tcp_port
    out = run(neighbour.sbx, f"python3 -c \"import socket; print(socket.create_connection(('127.0.0.1', {port}), 3).recv(100))\"")
    assert neighbour.marker in out.stdout, out.stderr


# --------------------------------------------------------------------------- network


@pytest.mark.parametrize("who", ("user", "root"))
def test_network_reaches_no_host_service(attacker, env, plants, neighbour, who):
    """The SoulBox API and gateway, the host's own listener (bound to every address), on the
    sandbox's loopback, on every host address and on the slot's gateway; the metadata address;
    the neighbour sandbox's listener on its address."""
    ports = [env.api_port, env.gateway_port, plants.tcp_port, 22]
    targets = [["127.0.0.1", p] for p in ports] + [["::1", env.api_port]]
    targets += [[addr, p] for addr in plants.addresses for p in ports]
    targets += [["169.254.169.254", 80], ["169.254.169.254", 443], ["fd00:ec2::254", 80]]
    if neighbour.address:
        targets.append([neighbour.address, neighbour.tcp_port])
    r = probe(attacker, "connect", who, {"targets": targets, "gateway_ports": ports}, timeout=600)
    check_blocked("reach the SoulBox API/gateway, host loopback and addresses, metadata IP, a neighbour", who, r,
                  f"gateway {r['data']['gateway']}")


def test_network_with_internet_access_off(sandboxes, env, plants):
    sbx = sandboxes.make(allow_internet_access=False)
    ports = [env.api_port, env.gateway_port, plants.tcp_port]
    targets = [[addr, p] for addr in ["127.0.0.1", *plants.addresses] for p in ports]
    targets += [["169.254.169.254", 80], ["1.1.1.1", 443]]
    r = probe(sbx, "connect", "root", {"targets": targets, "gateway_ports": ports}, timeout=600)
    check_blocked("allow_internet_access=false: reach anything", "root", r)
    sandboxes.kill(sbx)


# --------------------------------------------------------------------------- the agent and its files


@pytest.mark.parametrize("who", ("root", "sudo"))
def test_agent_binary(attacker, env, who):
    """Write, truncate, replace, unmount or over-mount /.soulbox/bin/soulbox. The host copy's
    hash is part of the state checked after every test."""
    check_blocked("overwrite / replace the agent binary (/.soulbox/bin/soulbox)", who, probe(attacker, "agent_binary", who))


@pytest.mark.parametrize("who", ("user", "root"))
def test_agent_sockets(attacker, env, neighbour, who):
    """No agent socket (own or others') is reachable by path; PID 1's fd 3 cannot be connected
    to through /proc; the host's socket file stays the one the agent serves."""
    own = sandbox_row(env, attacker.sandbox_id)["socket_path"]
    other = sandbox_row(env, neighbour.sbx.sandbox_id)["socket_path"]
    before = (Path(own).stat().st_ino, Path(other).stat().st_ino)
    r = probe(attacker, "agent_socket", who, {"host_paths": [own, other]})
    after = (Path(own).stat().st_ino, Path(other).stat().st_ino)
    problems = [k for k, v in r["steps"].items() if v == "ok"]
    if before != after:
        problems.append("a host agent socket was replaced")
    if run(attacker, "echo alive").stdout.strip() != "alive":
        problems.append("the agent stopped answering")
    record("connect to / replace the agent sockets (own and another sandbox's)", who, problems,
           summarize_steps(r["steps"]) + f"; sockets found inside: {r['data']['sockets'][:3]}")


def summarize_steps(steps: dict[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in steps.items())


def test_run_e2b_tampering(sandboxes, neighbour, env):
    """Rewrite /run/e2b (another sandbox's id) and swap it for a symlink to /etc, as root: the host
    never reads it, so the API's view and the neighbour are unaffected."""
    sbx = sandboxes.make(metadata={"escape-role": "tamper"})
    before = Sandbox.get_info(sbx.sandbox_id)
    r = probe(sbx, "run_e2b", "root", {"other_id": neighbour.sbx.sandbox_id})
    after = Sandbox.get_info(sbx.sandbox_id)
    problems = []
    if (before.sandbox_id, before.metadata, before.template_id) != (after.sandbox_id, after.metadata, after.template_id):
        problems.append(f"the API's view changed: {before} -> {after}")
    if Sandbox.get_info(neighbour.sbx.sandbox_id).sandbox_id != neighbour.sbx.sandbox_id:
        problems.append("the neighbour's info changed")
    if run(neighbour.sbx, "cat /run/e2b/.E2B_SANDBOX_ID").stdout.strip() != neighbour.sbx.sandbox_id:
        problems.append("the neighbour's /run/e2b changed")
    env_id = run(sbx, "echo $E2B_SANDBOX_ID").stdout.strip()
    if env_id != sbx.sandbox_id:
        problems.append(f"new processes got E2B_SANDBOX_ID={env_id}")
    record("tamper with /run/e2b to affect the host or another sandbox", "root", problems,
           f"inside: {json.dumps(r['data'])[:100]}; API, neighbour and new processes unaffected")
    sandboxes.kill(sbx)


@pytest.mark.parametrize("who", ("root", "sudo"))
def test_chroot_escape(attacker, plants, who):
    """The classic double-chroot escape: it ends at the sandbox's own root, never the host's."""
    r = probe(attacker, "chroot_escape", who, {"victim": str(plants.victim_file)})
    after = json.loads(r["data"]["after"]) if r["data"]["after"].startswith("{") else {}
    problems = []
    if after.get("victim"):
        problems.append("the host's file is visible after the chroot escape")
    if after and not after.get("agent"):
        problems.append(f"left the sandbox's root: {after.get('root')}")
    record("chroot escape (chroot, cd .. x64, chroot .)", who, problems, f"ends at: {r['data']['after'][:90]}")


def test_sudo_works_without_warnings(attacker):
    """The agent names the host in /etc/hosts, so sudo resolves it (no 'unable to resolve host')."""
    r = run(attacker, "sudo -n true")
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    assert run(attacker, "cat /etc/hostname").stdout.strip() == attacker.sandbox_id
