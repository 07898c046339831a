"""Run untrusted Python in a separate process with no network and hard limits.

Layers, each holding where the one before may not:

1. A new network namespace (`unshare -rn`) when the host allows unprivileged user namespaces:
   the child has no interfaces but a downed loopback, so nothing it does reaches a network.
2. Resource limits set in the child before the code runs: CPU seconds (RLIMIT_CPU), address
   space (RLIMIT_AS), bytes per written file (RLIMIT_FSIZE, which also caps stdout and stderr,
   since they are files) and processes (RLIMIT_NPROC).
3. An audit hook (PEP 578) installed before the code runs that refuses socket creation,
   process creation (fork, exec, spawn, subprocess), ctypes and writes outside the temporary
   working directory; it holds without any privilege, so a host without user namespaces still
   has no network from Python.
4. The parent kills the child's whole process group at a wall-clock timeout.

The audit hook guards against code that tries the ordinary ways (a model's code, not a
determined attacker with native code); the namespace and the limits are the hard boundary.
Hooks cannot be removed once added, and imports of the modules that bypass them
(`_ctypes`, `_posixsubprocess`) are refused. Where the sandbox runs as root (as in many
containers), the kernel does not enforce RLIMIT_NPROC and root may write anywhere: there the
hook is what stops a fork bomb or a write outside the folder, and the group kill ends any
process that slipped past it. Running the workers as an unprivileged user restores both limits.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

BLOCK_MARK = "forge-sandbox: blocked"

# Runs in the child before the user's code: limits, then the audit hook, then the code.
# Everything the hook reads lives in its closure, bound at install time, and the installer is
# deleted: the user's code can reach neither (through `sys.modules['__main__']`, a patched
# `os.path`, or `gc`) to switch the rules off.
_BOOT = r'''
import os, resource, sys

def _install(limits, mark, root):
    for name, (soft, hard) in limits.items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    # os.chdir too: with the folder fixed as the working directory, a relative path means the
    # same to the kernel as to the check below, whatever the code does to os.getcwd.
    deny_prefix = ("socket.", "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn",
                   "os.spawn", "subprocess.", "ctypes.", "os.kill", "os.killpg", "pty.", "gc.", "os.chdir")
    deny_import = frozenset({{"_ctypes", "ctypes", "_posixsubprocess", "_socket", "socket",
                              "multiprocessing", "gc"}})
    path_events = {{"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
                   "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,), "os.rename": (0, 1),
                   "os.replace": (0, 1), "os.link": (0, 1), "os.symlink": (0, 1), "shutil.rmtree": (0,)}}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, fsdecode, prefix = os.path.realpath, os.fsdecode, root + os.sep
    # Builtins too are bound now: the hook's global lookups would see a patched `builtins`.
    _isinstance, _any, _len, _str, _int, _Exception, _PermissionError = (
        isinstance, any, len, str, int, Exception, PermissionError)

    def inside(path):
        if _isinstance(path, _int):
            return True
        try:
            real = realpath(fsdecode(path))
        except _Exception:
            return False
        return real == root or real.startswith(prefix)

    def deny(what):
        raise _PermissionError(mark + " " + what)

    def hook(event, args):
        if event.startswith(deny_prefix):
            deny(event)
        if event == "import" and args[0].split(".")[0] in deny_import:
            deny("import " + args[0])
        if event == "open" and _len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writes = (_isinstance(mode, _str) and _any(c in mode for c in "wax+")) or (
                _isinstance(flags, _int) and flags & write_flags)
            if writes and not inside(path):
                deny("write outside the working directory: " + _str(path))
        elif event in path_events:
            for i in path_events[event]:
                if i < _len(args) and not inside(args[i]):
                    deny(event + " outside the working directory: " + _str(args[i]))

    sys.addaudithook(hook)

_install({lim!r}, {mark!r}, os.path.realpath(os.getcwd()))
del _install
sys.argv = ["main.py"]
with open("main.py") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f
exec(_code, {{"__name__": "__main__"}})
'''


@dataclass
class SandboxLimits:
    """Limits of one sandboxed run."""

    wall_s: float = 10.0
    """Wall-clock seconds before the process group is killed."""
    cpu_s: int = 5
    """CPU seconds (RLIMIT_CPU)."""
    memory_mb: int = 512
    """Address space in MiB (RLIMIT_AS)."""
    output_bytes: int = 1 << 20
    """Largest file the code may write, stdout and stderr included (RLIMIT_FSIZE)."""
    nproc: int = 256
    """Processes of the user (RLIMIT_NPROC, shared by all its sandboxes), a backstop behind the hook; not enforced for root."""
    shown_chars: int = 4000
    """Characters of stdout and of stderr kept in the result."""


@dataclass
class SandboxResult:
    """What a run did: its output, exit status, and which limit or rule stopped it, if any."""

    stdout: str
    stderr: str
    returncode: int
    limit: str | None = None
    """'wall', 'cpu', 'memory' or 'output' when a limit ended the run."""
    blocked: list[str] = field(default_factory=list)
    """Actions the sandbox refused, e.g. ['socket.__new__']."""
    isolated_network: bool = False
    """Whether the run had its own empty network namespace."""

    def report(self) -> str:
        """Text for the policy: output, then what the sandbox stopped."""
        parts = []
        if self.stdout:
            parts.append(self.stdout)
        if self.stderr:
            parts.append("stderr:\n" + self.stderr)
        if self.limit:
            parts.append(f"[stopped: {self.limit} limit]")
        if self.blocked:
            parts.append("[blocked by the sandbox: " + "; ".join(self.blocked) + "]")
        parts.append(f"[exit code {self.returncode}]")
        return "\n".join(parts)


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether `unshare -rn` works here (it needs unprivileged user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` as a script in a fresh temporary directory under `limits`; never raises on its behaviour."""
    work = tempfile.mkdtemp(prefix="forge-sandbox-")
    logs = tempfile.mkdtemp(prefix="forge-sandbox-logs-")
    try:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(code)
        # The CPU soft limit sends SIGXCPU, which names the cause; the hard one a second
        # later is SIGKILL for code that catches SIGXCPU.
        rl = {
            "RLIMIT_CPU": (int(limits.cpu_s), int(limits.cpu_s) + 1),
            "RLIMIT_AS": (int(limits.memory_mb) << 20,) * 2,
            "RLIMIT_FSIZE": (int(limits.output_bytes),) * 2,
            "RLIMIT_NPROC": (int(limits.nproc),) * 2,
        }
        boot = _BOOT.format(lim=rl, mark=BLOCK_MARK)
        isolated = network_namespace_available()
        cmd = (["unshare", "-rn"] if isolated else []) + [sys.executable, "-I", "-B", "-c", boot]
        with open(os.path.join(logs, "out"), "wb") as out, open(os.path.join(logs, "err"), "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work})
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            # Kill the whole group: anything the code started dies with it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        stdout = _read(os.path.join(logs, "out"), limits.shown_chars)
        stderr = _read(os.path.join(logs, "err"), limits.shown_chars)
        return SandboxResult(
            stdout=stdout, stderr=stderr, returncode=proc.returncode,
            limit=_which_limit(proc.returncode, stderr, timed_out), blocked=_blocked(stderr),
            isolated_network=isolated,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def _read(path: str, chars: int) -> str:
    with open(path, "rb") as f:
        data = f.read(chars * 4)
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= chars else text[:chars] + "\n[... output cut]"


def _which_limit(returncode: int, stderr: str, timed_out: bool) -> str | None:
    if timed_out:
        return "wall"
    # SIGKILL that we did not send comes from the CPU hard limit.
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "cpu"
    # Python ignores SIGXFSZ, so passing RLIMIT_FSIZE shows as EFBIG on a write.
    if returncode == -signal.SIGXFSZ or "File too large" in stderr:
        return "output"
    if "MemoryError" in stderr:
        return "memory"
    return None


def _blocked(stderr: str) -> list[str]:
    found = []
    for line in stderr.splitlines():
        at = line.find(BLOCK_MARK)
        if at >= 0:
            what = line[at + len(BLOCK_MARK):].strip()
            if what not in found:
                found.append(what)
    return found
