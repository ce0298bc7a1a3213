"""The login-shell script builder, executed by real bash and by sh (dash) the way a sandbox daemon does.

Three ways to hand the wrapped line to a shell, as daemons do: ``bash -c LINE``, ``sh`` reading the
line on stdin, and ``sh -c LINE`` with no bash on PATH (the sh fallback). HOME is a temporary
directory, so the profiles are ours; the program is this Python interpreter running a dump script
that prints its argv and environment as hex, so bytes are compared, not decoded text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.errors import SpecError
from controller.execution_script import (
    EXIT_SETUP_FAILED,
    MAX_COMMAND_BYTES,
    NONINTERACTIVE_DEFAULTS,
    SHELL_OWNED_NAMES,
    ScriptInputError,
    build_script,
    quote_argv,
    validate_env,
    wrap_for_exec,
)

PYTHON = os.path.realpath(sys.executable)
MODES = ("bash-c", "sh-stdin", "sh-no-bash")
DUMP = """\
import json, os, sys
json.dump({"argv": [os.fsencode(a).hex() for a in sys.argv[1:]],
           "env": {k.hex(): v.hex() for k, v in os.environb.items()}}, sys.stdout)
"""


@dataclass(frozen=True)
class Sandbox:
    """A fake sandbox: a home, a workspace, a dump program, a PATH without bash."""

    home: Path
    workspace: Path
    dump_program: Path
    no_bash_path: str

    def run(
        self,
        command: str,
        *,
        mode: str = "bash-c",
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin_path: str | None = None,
        daemon_env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        script = build_script(
            command, cwd=cwd, workspace=str(self.workspace), env=env or {}, stdin_path=stdin_path
        )
        line = wrap_for_exec(script)
        base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8"}
        base.update(daemon_env or {})
        if mode == "bash-c":
            args, feed = ["bash", "-c", line], None
        elif mode == "sh-stdin":
            args, feed = ["sh"], line.encode()
        else:
            assert mode == "sh-no-bash"
            args, feed, base["PATH"] = ["/bin/sh", "-c", line], None, self.no_bash_path
        return subprocess.run(
            args,
            env=base,
            input=feed,
            stdin=subprocess.DEVNULL if feed is None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.home,
            timeout=20,
        )

    def dump(
        self,
        argv: list[str],
        *,
        mode: str = "bash-c",
        env: Mapping[str, str] | None = None,
        daemon_env: Mapping[str, str] | None = None,
    ) -> tuple[list[bytes], dict[bytes, bytes]]:
        command = quote_argv([PYTHON, str(self.dump_program), *argv])
        done = self.run(command, mode=mode, env=env, daemon_env=daemon_env)
        assert done.returncode == 0, done.stdout
        data = json.loads(done.stdout)
        got_env = {bytes.fromhex(k): bytes.fromhex(v) for k, v in data["env"].items()}
        return [bytes.fromhex(a) for a in data["argv"]], got_env


def make_sandbox(root: Path) -> Sandbox:
    home, workspace, bin_dir = root / "home", root / "work space", root / "nobash-bin"
    for directory in (home, workspace, bin_dir):
        directory.mkdir()
    dump = root / "dump.py"
    dump.write_text(DUMP)
    for tool in ("sh", "cat", "printf", "pwd"):
        target = "/bin/dash" if tool == "sh" else f"/bin/{tool}"
        (bin_dir / tool).symlink_to(target)
    return Sandbox(home, workspace, dump, str(bin_dir))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Sandbox:
    """One sandbox with no profiles, for the Hypothesis properties (module scoped on purpose)."""
    return make_sandbox(tmp_path_factory.mktemp("shared"))


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    return make_sandbox(tmp_path)


def text(out: subprocess.CompletedProcess[bytes]) -> str:
    return out.stdout.decode()


# -- strategies ---------------------------------------------------------------------------------

SHELLISH = "'\"$`\\*?[]{}~!#&|;<>() \t\n\r-=%^@,:.aZ0é€😀"
words = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30),
    st.text(st.sampled_from(SHELLISH), max_size=30),
    st.sampled_from(
        ["", "-n", "-e", "--", "-", "$(id)", "`id`", "*", "~", "'", '"', "\\", "\n", "a=b", "%1"]
    ),
)
env_keys = st.from_regex(r"[A-Za-z0-9_]{0,10}", fullmatch=True).map(lambda s: "LCT_" + s)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=60, deadline=None)
@given(argv=st.lists(words, max_size=8), env=st.dictionaries(env_keys, words, max_size=5))
def test_arguments_and_env_values_arrive_byte_for_byte(
    shared: Sandbox, mode: str, argv: list[str], env: dict[str, str]
) -> None:
    got_argv, got_env = shared.dump(argv, mode=mode, env=env)
    assert got_argv == [a.encode() for a in argv]
    for key, value in env.items():
        assert got_env[key.encode()] == value.encode()


@settings(max_examples=30, deadline=None)
@given(value=words)
def test_env_reaches_every_program_of_a_shell_line(shared: Sandbox, value: str) -> None:
    line = "printf '%s|' \"$LCT_V\"; sh -c 'printf \"%s|\" \"$LCT_V\"' | cat && env | grep -q '^LCT_V='"
    out = shared.run(line, env={"LCT_V": value})
    assert out.returncode == 0
    assert out.stdout == f"{value}|{value}|".encode()


@settings(max_examples=300, deadline=None)
@given(
    key=st.one_of(
        st.text(max_size=12),
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True),
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}\n", fullmatch=True),
        st.sampled_from(sorted(SHELL_OWNED_NAMES)),
    )
)
def test_validate_env_accepts_exactly_the_valid_names(key: str) -> None:
    valid = bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)) and key not in SHELL_OWNED_NAMES
    try:
        assert validate_env({key: "v"}) == {key: "v"}
        accepted = True
    except SpecError:
        accepted = False
    assert accepted == valid


# -- refusing bad input before anything runs ----------------------------------------------------


@pytest.mark.parametrize(
    "key", ["", "1A", "A-B", "A B", "A=B", "é", "A\n", "UID", "_", "RANDOM", "SHELLOPTS"]
)
def test_invalid_env_keys_are_refused_before_a_script_exists(key: str) -> None:
    with pytest.raises(SpecError, match="env key"):
        validate_env({key: "secret-value"})
    with pytest.raises(SpecError) as caught:
        build_script("true", cwd=None, workspace=None, env={"OK": "1", key: "secret-value"})
    assert "secret-value" not in str(caught.value)


@pytest.mark.parametrize("value", ["a\x00b", "\ud800"])
def test_env_values_that_cannot_cross_exec_are_refused_without_showing_them(value: str) -> None:
    with pytest.raises(ScriptInputError, match="TOKEN") as caught:
        validate_env({"TOKEN": value})
    assert value not in str(caught.value)
    assert isinstance(caught.value, SpecError) and isinstance(caught.value, ValueError)


def test_nul_and_empty_commands_are_refused() -> None:
    with pytest.raises(ScriptInputError, match="NUL"):
        quote_argv(["echo", "a\x00b"])
    with pytest.raises(ScriptInputError, match="empty"):
        quote_argv([])
    with pytest.raises(ScriptInputError, match="list"):
        quote_argv("echo hi")
    with pytest.raises(ScriptInputError, match="NUL"):
        build_script("echo a\x00", cwd=None, workspace=None, env={})
    with pytest.raises(ScriptInputError, match="empty"):
        build_script("  \n", cwd=None, workspace=None, env={})
    with pytest.raises(ScriptInputError, match="NUL"):
        build_script("true", cwd="/a\x00", workspace=None, env={})


def test_the_first_word_is_always_quoted_so_it_is_always_a_program(box: Sandbox) -> None:
    # Later words stay bare only when no shell treats any of their characters specially.
    assert quote_argv(["A=B", "if", "", "a b", "~x", "x*"]) == "'A=B' if '' 'a b' '~x' 'x*'"
    out = box.run(quote_argv(["A=B", "x"]))
    assert out.returncode == 127 and b"A=B" in out.stdout


# -- exit codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_exit_codes_come_back_as_is_and_exit_cannot_escape(box: Sandbox, mode: str) -> None:
    out = box.run("echo before; exit 3; echo after", mode=mode)
    assert (out.returncode, out.stdout) == (3, b"before\n")
    assert box.run(quote_argv([PYTHON, "-c", "raise SystemExit(42)"]), mode=mode).returncode == 42
    assert box.run("false", mode=mode).returncode == 1
    assert box.run("nosuchprogram-xyz", mode=mode).returncode == 127
    assert box.run("sh -c 'kill -9 $$'", mode=mode).returncode == 137


def test_the_sh_fallback_really_runs_without_bash(box: Sandbox) -> None:
    assert text(box.run('echo "${BASH_VERSION:-no bash}"', mode="sh-no-bash")) == "no bash\n"
    assert text(box.run('echo "${BASH_VERSION:-no bash}"')) != "no bash\n"


def test_a_large_argv_runs_and_a_too_long_command_is_refused(box: Sandbox) -> None:
    # About 120 kB once wrapped: the command is quoted twice (a variable in the script, which is
    # itself one quoted word), so quote-heavy arguments take more room than their length.
    argv = [f"arg {i} $x `y` \\ 'q' " + "é" * 200 for i in range(225)]
    line = wrap_for_exec(build_script(quote_argv(argv), cwd=None, workspace=None, env={}))
    assert 100_000 < len(line.encode()) <= MAX_COMMAND_BYTES
    got, _ = box.dump(argv)
    assert got == [a.encode() for a in argv]
    with pytest.raises(ScriptInputError, match="too long"):
        wrap_for_exec(build_script(quote_argv(["x" * MAX_COMMAND_BYTES]), cwd=None, workspace=None, env={}))


# -- env defaults and precedence ----------------------------------------------------------------


def test_noninteractive_defaults_are_set_and_the_caller_overrides_them(box: Sandbox) -> None:
    _, env = box.dump([])
    for key, value in NONINTERACTIVE_DEFAULTS.items():
        assert env[key.encode()] == value.encode()
    _, env = box.dump([], env={"GIT_TERMINAL_PROMPT": "1", "PAGER": "less"})
    assert env[b"GIT_TERMINAL_PROMPT"] == b"1" and env[b"PAGER"] == b"less"
    assert env[b"DEBIAN_FRONTEND"] == b"noninteractive"


def test_defaults_do_not_clobber_what_the_sandbox_already_sets(box: Sandbox) -> None:
    (box.home / ".profile").write_text("export GIT_SSH_COMMAND='ssh -i ~/.ssh/deploy'\n")
    _, env = box.dump([], daemon_env={"PAGER": "more"})
    assert env[b"PAGER"] == b"more"
    assert env[b"GIT_SSH_COMMAND"] == b"ssh -i ~/.ssh/deploy"


@pytest.mark.parametrize("mode", MODES)
def test_profiles_cannot_override_the_callers_env(box: Sandbox, mode: str) -> None:
    (box.home / ".profile").write_text("export TOKEN=from-profile LCT_OTHER=profile\n")
    (box.home / ".bash_profile").write_text("export TOKEN=from-bash-profile\n")
    _, env = box.dump([], mode=mode, env={"TOKEN": "from-caller"})
    assert env[b"TOKEN"] == b"from-caller" and env[b"LCT_OTHER"] == b"profile"


# -- profiles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("profile", [".profile", ".bash_profile", ".bashrc", ".zprofile"])
def test_a_path_entry_exported_by_a_profile_is_visible(box: Sandbox, mode: str, profile: str) -> None:
    tools = box.home / "tools bin"
    tools.mkdir()
    (tools / "mytool").write_text('#!/bin/sh\necho "mytool $*"\n')
    (tools / "mytool").chmod(0o755)
    (box.home / profile).write_text('export PATH="$HOME/tools bin:$PATH"\n')
    out = box.run(quote_argv(["mytool", "a b"]), mode=mode)
    assert (out.returncode, text(out)) == (0, "mytool a b\n")


def test_bashrc_is_used_only_without_a_bash_profile(box: Sandbox) -> None:
    (box.home / ".bashrc").write_text("export LCT_FROM=bashrc\n")
    assert text(box.run('echo "$LCT_FROM"')) == "bashrc\n"
    (box.home / ".bash_profile").write_text("export LCT_OTHER=bash_profile\n")
    assert text(box.run('echo "$LCT_FROM $LCT_OTHER"')) == " bash_profile\n"


@pytest.mark.parametrize("mode", MODES)
def test_functions_from_profiles_are_callable(box: Sandbox, mode: str) -> None:
    (box.home / ".profile").write_text('greet() { echo "hello $1"; }\n')
    assert text(box.run(quote_argv(["greet", "you"]), mode=mode)) == "hello you\n"


NOISY_PROFILE = """\
echo profile noise
echo profile error >&2
read line; cat >/dev/null
false
alias printf='echo ALIASED'
set -ux
export -f nosuch
trap 'echo exit trap' EXIT
cd /
if then fi (
"""
ERREXIT_PROFILE = "set -e -o pipefail\nfalse | true\nfalse\necho unreachable\n"


@pytest.mark.parametrize("mode", MODES)
def test_noisy_and_failing_profiles_change_neither_output_nor_exit_code(box: Sandbox, mode: str) -> None:
    (box.home / ".profile").write_text(NOISY_PROFILE)
    (box.home / ".bash_profile").write_text("shopt -s nullglob; arr=(a b); [[ -n x ]]\n" + NOISY_PROFILE)
    (box.home / ".zprofile").write_text("typeset -U path\npath=(~/bin $path)\n[[ -o login ]] && echo zsh\n")
    if mode == "bash-c":  # dash ends a shell whose dot script sets -e and fails, as a dash login would
        (box.home / ".bash_profile").write_text(ERREXIT_PROFILE)
    out = box.run("printf '%s\\n' ok; echo $NOPE; false | true; exit 5", mode=mode)
    assert (out.returncode, text(out)) == (5, "ok\n\n")
    assert text(box.run("pwd", mode=mode)) == f"{box.workspace}\n"


# -- working directory --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cwd_defaults_to_the_workspace_and_an_explicit_cwd_wins(box: Sandbox, mode: str) -> None:
    assert text(box.run("pwd", mode=mode)) == f"{box.workspace}\n"
    odd = box.home / 'it\'s a "dir" $x `y`'
    odd.mkdir()
    assert text(box.run("pwd", mode=mode, cwd=str(odd))) == f"{odd}\n"
    (box.home / "-dash").mkdir()
    assert text(box.run("pwd", mode=mode, cwd="-dash")) == f"{box.home}/-dash\n"


def test_no_cwd_and_no_workspace_stays_where_the_shell_started(box: Sandbox) -> None:
    script = build_script("pwd", cwd=None, workspace=None, env={})
    out = subprocess.run(["bash", "-c", wrap_for_exec(script)], cwd=box.home, capture_output=True, check=True)
    assert out.stdout == f"{box.home}\n".encode()


@pytest.mark.parametrize("mode", MODES)
def test_a_missing_cwd_fails_with_a_message_and_the_setup_exit_code(box: Sandbox, mode: str) -> None:
    out = box.run("echo should-not-run", mode=mode, cwd="/nonexistent dir")
    assert out.returncode == EXIT_SETUP_FAILED
    assert "leasectl: cannot change directory to /nonexistent dir" in text(out)
    assert "should-not-run" not in text(out)


# -- stdin --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "/bin/sh"])
def test_stdin_from_a_file_arrives_byte_exact(box: Sandbox, shell: str, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096 + b"\x00\r\n'\"$"  # 1 MiB of every byte value
    stdin = tmp_path / "stdin file's"
    stdin.write_bytes(data)
    out = subprocess.run(  # stdout only: stderr must stay out of the comparison
        [shell, "-c", wrap_for_exec(build_script("cat", env={}, stdin_path=str(stdin)))],
        stdout=subprocess.PIPE,
        env={"PATH": box.no_bash_path if shell == "/bin/sh" else "/usr/bin:/bin", "HOME": str(box.home)},
        stdin=subprocess.DEVNULL,
        timeout=20,
    )
    assert out.returncode == 0 and out.stdout == data


def test_a_missing_stdin_file_fails_with_the_setup_exit_code(box: Sandbox) -> None:
    out = box.run("cat; echo ran", stdin_path="/nonexistent/stdin")
    assert out.returncode == EXIT_SETUP_FAILED and "cannot read the stdin file" in text(out)
    assert "ran" not in text(out)


def test_without_stdin_the_command_reads_dev_null_even_if_the_daemon_leaves_a_pipe_open(box: Sandbox) -> None:
    line = wrap_for_exec(build_script("cat; echo done", env={}))
    with subprocess.Popen(["bash", "-c", line], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.read() == b"done\n"  # the pipe is never closed: cat must not wait on it
        assert proc.wait(timeout=5) == 0
        assert proc.stdin is not None
        proc.stdin.close()


# -- adversarial input (issue 17): never a second shell, never a crash -----------------------------


def test_ten_thousand_arguments_arrive_in_order(box: Sandbox) -> None:
    argv = [str(i) for i in range(10_000)]
    got, _ = box.dump(argv)
    assert got == [a.encode() for a in argv]


def test_ten_thousand_quote_heavy_arguments_are_refused_with_a_message() -> None:
    argv = [f"-{i}; '$(x)'" for i in range(10_000)]
    with pytest.raises(ScriptInputError, match=r"too long.*pass large data as stdin"):
        wrap_for_exec(build_script(quote_argv(argv), cwd=None, workspace=None, env={}))


def test_a_one_megabyte_line_is_refused_with_a_message_not_run() -> None:
    with pytest.raises(ScriptInputError, match="too long"):
        wrap_for_exec(build_script(quote_argv(["echo", "y" * 1_048_576]), cwd=None, workspace=None, env={}))


@pytest.mark.parametrize("arg", ["\udcff", "a\ud800b", "\udc80\udc81"])
def test_text_that_is_not_utf8_is_refused_before_a_script_exists(arg: str) -> None:
    """Lone surrogates (how Python carries undecodable bytes) cannot be sent as UTF-8: refused with a
    clear error instead of reaching a shell in some mangled form."""
    with pytest.raises(ScriptInputError):
        wrap_for_exec(build_script(quote_argv(["echo", arg]), cwd=None, workspace=None, env={}))


def test_shell_metacharacters_in_a_1kb_argument_are_data(box: Sandbox) -> None:
    nasty = ("$(touch pwned) `touch pwned` ; touch pwned && || | > pwned < /etc/passwd \n" * 14)[:1000]
    got, _ = box.dump([nasty])
    assert got == [nasty.encode()]
    assert not (box.home / "pwned").exists() and not (box.workspace / "pwned").exists()
