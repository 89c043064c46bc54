"""Sandbox ↔ kernel: every interface that reaches past the sandbox, tried as `user`, as sandbox
root and through `sudo`. Each step must fail; the autouse check then finds the host unchanged."""

from __future__ import annotations

import pytest

from conftest import WHO, check_blocked, probe, record

# (probe name, what it attacks) — each run as user, root and sudo.
KERNEL_ATTACKS = [
    ("kexec", "kexec: replace the running kernel (kexec_load, kexec_file_load, reboot)"),
    ("kernel_modules", "load/unload a kernel module (init_module, finit_module, delete_module, modprobe)"),
    ("bpf", "bpf: load a program, create a map"),
    ("perf_event_open", "perf_event_open on itself and on every CPU"),
    ("userfaultfd", "userfaultfd (syscall and /dev/userfaultfd)"),
    ("keyctl", "kernel keyrings: add_key, keyctl, request_key"),
    ("io_uring", "io_uring_setup"),
    ("open_by_handle", "open_by_handle_at / name_to_handle_at (shocker)"),
    ("mount", "mount tmpfs/proc/sysfs/cgroup/overlay/bind/remount, fsopen, open_tree, fspick"),
    ("umount", "unmount /proc, /dev, the agent binary, /"),
    ("pivot_root", "pivot_root out of the sandbox root"),
    ("unshare", "new namespaces: unshare/clone/clone3 with every CLONE_NEW* flag, unshare(1)"),
    ("setns", "setns on every namespace reachable through /proc/*/ns and /proc/*/fd, nsenter(1)"),
    ("kernel_memory", "read /proc/kcore, /dev/mem, /dev/kmem, /dev/port, /proc/kmsg, /dev/kmsg, disks"),
    ("sysfs", "/sys: write it, see firmware or host interfaces, mount another sysfs"),
    ("proc_sys_write", "write /proc/sys (hostname, core_pattern, modprobe, drop_caches, ip_forward, ...)"),
    ("sysrq", "write /proc/sysrq-trigger"),
    ("hostname", "change the hostname / domain name"),
    ("clock", "set the host clock (clock_settime, settimeofday, adjtimex, clock_adjtime, date -s)"),
    ("dmesg", "read or clear the kernel log (syslog(2), dmesg)"),
    ("misc_syscalls", "iopl, ioperm, swapon/off, acct, quotactl, lookup_dcookie, fanotify, personality"),
    ("sockets", "raw and exotic sockets: AF_PACKET, raw IP, AF_VSOCK, Bluetooth, AF_KEY, AF_ALG, RDS, TIPC"),
    ("net_config", "reconfigure the sandbox's network (lo down, addresses, routes)"),
    ("tiocsti", "push input into a terminal (TIOCSTI)"),
    ("overlay_xattr", "forge overlayfs trusted.* xattrs (redirect/opaque/metacopy)"),
    ("cgroup", "cgroup escape: mount cgroupfs for release_agent, write its own limits, leave its cgroup"),
]


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize(("name", "what"), KERNEL_ATTACKS, ids=[a[0] for a in KERNEL_ATTACKS])
def test_kernel_interface_is_closed(attacker, name, what, who):
    check_blocked(what, who, probe(attacker, name, who))


@pytest.mark.parametrize("who", WHO)
def test_mknod_host_disk(attacker, plants, who):
    """mknod the host's root disk (and /dev/mem, /dev/kmsg, loop-control, ...) and open it."""
    major, minor = plants.disk
    r = probe(attacker, "mknod", who, {"disk_major": major, "disk_minor": minor})
    check_blocked(f"mknod the host disk ({major}:{minor}) and other devices, open them", who, r)


@pytest.mark.parametrize("who", WHO)
def test_keyrings_show_nothing_of_the_host(attacker, who):
    r = probe(attacker, "keyctl", who)
    keys = r["data"]["proc_keys"]
    problems = [f"/proc/keys shows host keys: {keys[:200]}"] if keys.strip() and not keys.startswith("E") else []
    record("read the host's kernel keys (/proc/keys)", who, problems, f"/proc/keys: {keys.strip()[:60] or 'empty'}")


@pytest.mark.parametrize("who", ("root", "sudo"))
def test_core_pattern(attacker, who):
    """Point core_pattern at a program (a host-root upcall), then dump core."""
    r = probe(attacker, "core_pattern", who)
    problems = [f"{k}: went through" for k, v in r["steps"].items() if v == "ok"]
    # The crash itself is fine; what matters is that the host's core_pattern (checked after every
    # test) did not change and no helper ran on the host.
    record("core_pattern: set a pipe helper, then crash", who, problems, f"{r['steps']}, crash: {r['data']['crash']}")
