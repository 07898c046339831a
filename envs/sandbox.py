"""Run untrusted Python in a separate process with no network and hard limits.

Layers, each holding where the one before may not:

1. A fixed environment: the child gets PATH, LANG, HOME and TMPDIR (the last two its own
   folder) and nothing of the parent's, so API keys and tokens never reach it.
2. A new network namespace (`unshare -rn`) when the host allows unprivileged user namespaces:
   the child has no interfaces but a downed loopback, so nothing it does reaches a network.
3. Resource limits set in the child before the code runs: CPU seconds (RLIMIT_CPU), address
   space (RLIMIT_AS), bytes per written file (RLIMIT_FSIZE, which also caps stdout and stderr,
   since they are files) and processes (RLIMIT_NPROC).
4. Functions that act outside the folder or on other processes without raising an audit event
   (`os.mknod`, `os.mkfifo`, `os.chroot`, `os.pidfd_open`, `signal.pidfd_send_signal`,
   `os.setpriority`, `os.sched_set*`) are replaced by ones that refuse, and `_imp.create_builtin`
   with them, so a fresh copy of `posix` cannot bring them back.
5. An audit hook (PEP 578) installed before the code runs that refuses: sockets; process creation
   (fork, exec, spawn, subprocess) and subinterpreters; native modules that act unseen by it
   (ctypes, cffi, `_posixsubprocess`, `_posixshmem`, sqlite3, readline, ...), under any package
   name; writes outside the working directory; reads and listings outside it, the Python
   installation and the process's own /proc entries (so /etc, home directories, the project's
   sources and other processes' /proc files are closed); a descriptor for a directory outside it
   (which `dir_fd=` would otherwise turn into a write there); signals to other processes
   (`os.kill`, fcntl F_SETOWN/F_SETSIG, ioctl, `resource.prlimit`); raising its own limits. It
   holds without any privilege, so a host without user namespaces still has no network from
   Python.
6. The parent kills the child's whole process group at a wall-clock timeout.

The audit hook guards against code that tries the ordinary ways (a model's code, not a
determined attacker with native code); the namespace, the limits and file permissions are the
hard boundary. Hooks cannot be removed once added. Where the sandbox runs as root (as in many
containers), the kernel does not enforce RLIMIT_NPROC and root may read and write anywhere:
there the hook is what stops a fork bomb or a write or read outside the folder, and the group
kill ends any process that slipped past it. What the hook cannot close: a second thread that
swaps a symlink or renames a directory between its path check and the kernel's lookup, a native
extension in the environment that it does not know, and memory corruption through an
interpreter bug; and files written inside the folder are bounded only by time until it is
deleted. Running the workers as an unprivileged user (and TMPDIR on a size-limited tmpfs)
restores the kernel's limits under all of these. docs/reliability.md lists the escapes tried.
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

# Runs in the child before the user's code: limits, then what raises no audit event is taken
# away, then the audit hook, then the code. Everything the hook reads lives in its closure, bound
# at install time, and the installers are deleted: the user's code can reach neither (through
# `sys.modules['__main__']`, a patched `os.path`, or `gc`) to switch the rules off.
_BOOT = r'''
import os, resource, sys

def _strip(mark, unaudited):
    # Builtin modules load now, and then `_imp.create_builtin` refuses, so the code cannot build a
    # second `posix` or `_signal` that still has the functions removed below (a reload keeps them out).
    for name in sys.builtin_module_names:
        if name != "gc":
            __import__(name)
    import _imp

    def refuse(what):
        def refused(*args, **kwargs):
            raise PermissionError(mark + " " + what)
        return refused

    for module_name, names in unaudited.items():
        module = sys.modules[module_name]
        for name in names:
            if name in module.__dict__:
                module.__dict__[name] = refuse(module_name.lstrip("_") + "." + name)
    # os keeps the functions in these sets too, where they could be picked out by name.
    for kept in (os.supports_dir_fd, os.supports_fd, os.supports_follow_symlinks, os.supports_effective_ids):
        for f in list(kept):
            if f.__name__ in unaudited["posix"]:
                kept.discard(f)

    def create_builtin(spec):
        raise ImportError(mark + " import " + spec.name)

    _imp.create_builtin = create_builtin

def _install(limits, mark, root):
    for name, (soft, hard) in limits.items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    # os.chdir too: with the folder fixed as the working directory, a relative path means the
    # same to the kernel as to the checks below, whatever the code does to os.getcwd.
    deny_prefix = ("socket.", "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn",
                   "os.spawn", "subprocess.", "ctypes.", "os.kill", "os.killpg", "pty.", "gc.", "os.chdir",
                   "resource.prlimit", "fcntl.ioctl", "cpython.PyInterpreterState_New")
    # Checked against every part of a dotted name and the file's name: a native module loaded
    # under another package name (`pkg._posixsubprocess`) is still itself.
    deny_import = frozenset({{"_ctypes", "ctypes", "_posixsubprocess", "_socket", "socket", "multiprocessing",
                              "_multiprocessing", "_posixshmem", "gc", "_xxsubinterpreters", "_cffi_backend",
                              "cffi", "_sqlite3", "sqlite3", "readline", "syslog", "spwd", "nis"}})
    path_events = {{"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
                   "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,), "os.rename": (0, 1),
                   "os.replace": (0, 1), "os.link": (0, 1), "os.symlink": (0, 1), "shutil.rmtree": (0,),
                   "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,)}}
    # Linux F_SETOWN, F_SETSIG and F_SETOWN_EX: they make I/O on a descriptor signal any process.
    deny_fcntl = frozenset({{8, 10, 15}})
    kept_limits = frozenset(getattr(resource, name) for name in limits)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, fsdecode, isdir, prefix = os.path.realpath, os.fsdecode, os.path.isdir, root + os.sep
    # Reads outside the folder: the Python installation (the standard library, site-packages),
    # a few devices and this process's own /proc entries; not /etc, home directories, the
    # project's sources, or any other process.
    own = "/proc/" + str(os.getpid())
    prefixes = {{sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}}
    read_roots = tuple(sorted(realpath(p) + os.sep for p in prefixes)) + (own + "/", "/usr/share/zoneinfo/")
    read_files = frozenset({{own, "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random",
                            "/proc/cpuinfo", "/proc/meminfo"}})
    # Builtins too are bound now: the hook's global lookups would see a patched `builtins`.
    _isinstance, _any, _len, _str, _int, _Exception, _PermissionError = (
        isinstance, any, len, str, int, Exception, PermissionError)

    def resolve(path):
        # A descriptor stands for the file it is open on.
        if _isinstance(path, _int):
            path = "/proc/self/fd/" + _str(path)
        try:
            return realpath(fsdecode(path))
        except _Exception:
            return ""

    def inside(real):
        return real == root or real.startswith(prefix)

    def readable(real):
        return inside(real) or real in read_files or real.startswith(read_roots)

    def deny(what):
        raise _PermissionError(mark + " " + what)

    def check_open(path, mode, flags):
        if _isinstance(path, _int):
            return
        real = resolve(path)
        writes = (_isinstance(mode, _str) and _any(c in mode for c in "wax+")) or (
            _isinstance(flags, _int) and flags & write_flags)
        if writes and not (inside(real) or real == "/dev/null"):
            deny("write outside the working directory: " + _str(path))
        if not readable(real):
            deny("read outside the working directory: " + _str(path))
        # A directory descriptor would let `dir_fd=` place relative paths outside the folder.
        if not inside(real) and isdir(real):
            deny("open of a directory outside the working directory: " + _str(path))

    def hook(event, args):
        if event.startswith(deny_prefix):
            deny(event)
        if event == "import":
            names = args[0].split(".") + [_str(args[1] or "").rpartition("/")[2].split(".")[0]]
            if _any(n in deny_import or n.startswith("_test") for n in names):
                deny("import " + args[0])
        elif event == "open" and _len(args) >= 3:
            check_open(args[0], args[1], args[2])
        elif event in path_events:
            for i in path_events[event]:
                if i < _len(args) and not inside(resolve(args[i])):
                    deny(event + " outside the working directory: " + _str(args[i]))
        elif event in ("os.listdir", "os.scandir"):
            if not readable(resolve("." if args[0] is None else args[0])):
                deny(event + " outside the working directory: " + _str(args[0]))
        elif event == "fcntl.fcntl" and args[1] in deny_fcntl:
            deny("fcntl command " + _str(args[1]) + " (signals to other processes)")
        elif event == "resource.setrlimit" and args[0] in kept_limits:
            deny("resource.setrlimit of a sandbox limit")

    sys.addaudithook(hook)

_strip({mark!r}, {unaudited!r})
_install({lim!r}, {mark!r}, os.path.realpath(os.getcwd()))
del _strip, _install
sys.argv = ["main.py"]
with open("main.py") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f
exec(_code, {{"__name__": "__main__"}})
'''

# Functions that act outside the folder or on other processes but raise no audit event, so the
# hook would never see them: device and FIFO nodes, chroot, signals by pidfd, and the priority,
# CPU affinity and scheduling of any process of the same user.
_UNAUDITED_OS = ("mknod", "mkfifo", "chroot", "pidfd_open", "setpriority", "sched_setaffinity",
                 "sched_setscheduler", "sched_setparam")
_UNAUDITED = {"posix": _UNAUDITED_OS, "os": _UNAUDITED_OS, "_signal": ("pidfd_send_signal",)}


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
        boot = _BOOT.format(lim=rl, mark=BLOCK_MARK, unaudited=_UNAUDITED)
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
        # A full stderr has no room left for the traceback that would name the cause.
        flooded = max(os.path.getsize(os.path.join(logs, n)) for n in ("out", "err")) >= limits.output_bytes
        return SandboxResult(
            stdout=stdout, stderr=stderr, returncode=proc.returncode,
            limit=_which_limit(proc.returncode, stderr, timed_out, flooded), blocked=_blocked(stderr),
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


def _which_limit(returncode: int, stderr: str, timed_out: bool, flooded: bool = False) -> str | None:
    if timed_out:
        return "wall"
    # SIGKILL that we did not send comes from the CPU hard limit.
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "cpu"
    # Python ignores SIGXFSZ, so passing RLIMIT_FSIZE shows as EFBIG on a write.
    if returncode == -signal.SIGXFSZ or "File too large" in stderr or (flooded and returncode != 0):
        return "output"
    # Python raises MemoryError; mmap and thread stacks report ENOMEM.
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
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
