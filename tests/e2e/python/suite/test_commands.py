"""`sbx.commands`: output, exit codes, environment, cwd, users, background processes."""

from __future__ import annotations

import pytest
from e2b import CommandExitException, TimeoutException

from helpers import wait_until


def test_stdout(shared_sandbox):
    result = shared_sandbox.commands.run("echo hello; printf 'no newline'")
    assert result.exit_code == 0
    assert result.stdout == "hello\nno newline"
    assert result.stderr == ""


def test_stderr(shared_sandbox):
    result = shared_sandbox.commands.run("echo to-err >&2; echo to-out")
    assert result.stderr == "to-err\n"
    assert result.stdout == "to-out\n"


def test_output_callbacks_see_the_stream(shared_sandbox):
    out: list[str] = []
    err: list[str] = []
    shared_sandbox.commands.run(
        "for i in 1 2 3; do echo out$i; echo err$i >&2; done",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert "".join(out) == "out1\nout2\nout3\n"
    assert "".join(err) == "err1\nerr2\nerr3\n"


def test_nonzero_exit_raises_command_exit_exception(shared_sandbox):
    with pytest.raises(CommandExitException) as info:
        shared_sandbox.commands.run("echo partial; echo 'it broke' >&2; exit 7")
    assert info.value.exit_code == 7
    assert info.value.stderr == "it broke\n"
    assert info.value.stdout == "partial\n"


def test_missing_binary_is_exit_127(shared_sandbox):
    with pytest.raises(CommandExitException) as info:
        shared_sandbox.commands.run("definitely-not-a-command-xyz")
    assert info.value.exit_code == 127
    assert "not found" in info.value.stderr


def test_large_output_is_intact(shared_sandbox):
    # 200k lines ≈ 1.3 MB: arbitrary chunking on the way must not lose or reorder bytes.
    result = shared_sandbox.commands.run("seq 1 200000")
    lines = result.stdout.splitlines()
    assert len(lines) == 200000
    assert lines[0] == "1" and lines[-1] == "200000"
    assert lines == [str(i) for i in range(1, 200001)]


def test_command_env_vars(shared_sandbox):
    result = shared_sandbox.commands.run('echo "$GREETING|$OTHER"', envs={"GREETING": "hi there", "OTHER": "a=b;c"})
    assert result.stdout == "hi there|a=b;c\n"
    # Per-command variables do not leak into later commands.
    assert shared_sandbox.commands.run('echo "${GREETING-unset}"').stdout == "unset\n"


def test_create_time_env_vars_reach_every_command(shared_sandbox):
    assert shared_sandbox.commands.run('echo "$SBX_CREATE_VAR"').stdout == "from create\n"
    assert shared_sandbox.commands.run('echo "$SBX_CREATE_VAR"', user="root").stdout == "from create\n"
    # A per-command value wins over the create-time one.
    overridden = shared_sandbox.commands.run('echo "$SBX_CREATE_VAR"', envs={"SBX_CREATE_VAR": "mine"})
    assert overridden.stdout == "mine\n"


def test_e2b_sandbox_env(shared_sandbox):
    result = shared_sandbox.commands.run('echo "$E2B_SANDBOX|$E2B_SANDBOX_ID"')
    assert result.stdout == f"true|{shared_sandbox.sandbox_id}\n"
    files = shared_sandbox.commands.run("cat /run/e2b/.E2B_SANDBOX_ID")
    assert files.stdout.strip() == shared_sandbox.sandbox_id


def test_hostname_is_the_sandbox_id(shared_sandbox):
    assert shared_sandbox.commands.run("hostname").stdout.strip() == shared_sandbox.sandbox_id


def test_cwd(shared_sandbox):
    assert shared_sandbox.commands.run("pwd").stdout == "/home/user\n"
    assert shared_sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    shared_sandbox.commands.run("mkdir -p '/tmp/dir with space'")
    assert shared_sandbox.commands.run("pwd", cwd="/tmp/dir with space").stdout == "/tmp/dir with space\n"


def test_default_user(shared_sandbox):
    result = shared_sandbox.commands.run('whoami; id -u; id -g; echo "$HOME"; echo "$USER"')
    assert result.stdout.split("\n")[:5] == ["user", "1000", "1000", "/home/user", "user"]


def test_root_user(shared_sandbox):
    result = shared_sandbox.commands.run('whoami; id -u; echo "$HOME"; pwd', user="root")
    lines = result.stdout.split("\n")
    assert lines[:3] == ["root", "0", "/root"]


def test_user_can_sudo(shared_sandbox):
    assert shared_sandbox.commands.run("sudo -n whoami").stdout == "root\n"


def test_files_created_by_commands_belong_to_the_user(shared_sandbox):
    shared_sandbox.commands.run("touch /home/user/owned-by-user")
    shared_sandbox.commands.run("touch /tmp/owned-by-root", user="root")
    result = shared_sandbox.commands.run("stat -c %U /home/user/owned-by-user /tmp/owned-by-root")
    assert result.stdout == "user\nroot\n"


def test_background_command_list_and_kill(shared_sandbox):
    handle = shared_sandbox.commands.run("sleep 600", background=True)
    assert handle.pid > 0
    pids = {p.pid for p in shared_sandbox.commands.list()}
    assert handle.pid in pids
    listed = next(p for p in shared_sandbox.commands.list() if p.pid == handle.pid)
    assert listed.cmd == "/bin/bash" and "sleep 600" in listed.args[-1]
    assert shared_sandbox.commands.kill(handle.pid) is True
    assert wait_until(lambda: handle.pid not in {p.pid for p in shared_sandbox.commands.list()}, 10)
    # Killing a process that no longer exists reports False, not an error.
    assert shared_sandbox.commands.kill(handle.pid) is False


def test_background_command_output_and_wait(shared_sandbox):
    handle = shared_sandbox.commands.run("sleep 1; echo done-late", background=True)
    result = handle.wait()
    assert result.stdout == "done-late\n" and result.exit_code == 0


def test_command_timeout_kills_the_process(shared_sandbox):
    # The SDK reports the expiry either as its own deadline or as the killed process's end event.
    with pytest.raises((TimeoutException, CommandExitException)):
        shared_sandbox.commands.run("sleep 4242", timeout=2)
    # Connect-Timeout-Ms is the process lifetime: the sleep must be gone, not left running.
    # (The bracket keeps pgrep from matching the shell that runs it.)
    assert wait_until(
        lambda: shared_sandbox.commands.run("pgrep -f 'sleep 424[2]' || true").stdout.strip() == "", 15
    ), "process outlived its command timeout"
