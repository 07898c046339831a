"""The python env's sandbox: code that opens a socket, forks, writes outside its folder or runs
away is stopped, and the result says so."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from envs.python_env import PythonEnv
from envs.sandbox import SandboxLimits, network_namespace_available, run_python

FAST = SandboxLimits(wall_s=3.0, cpu_s=1, memory_mb=256, output_bytes=64 << 10)


def test_plain_code_runs_in_a_fresh_folder():
    res = run_python("import os\nopen('x.txt', 'w').write('hi')\nprint(open('x.txt').read(), os.listdir('.'))", FAST)
    assert res.returncode == 0 and res.limit is None and res.blocked == []
    assert res.stdout.strip() == "hi ['main.py', 'x.txt']"


@pytest.mark.parametrize("code, blocked", [
    ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)", "import socket"),
    ("import _socket\n_socket.socket()", "import _socket"),
    ("import os\nwhile True:\n    os.fork()", "os.fork"),
    ("import os\nos.system('echo escaped')", "os.system"),
    ("import subprocess\nsubprocess.run(['true'])", "import _posixsubprocess"),
    ("import ctypes", "import ctypes"),
], ids=["socket", "raw-socket", "fork-bomb", "system", "subprocess", "ctypes"])
def test_forbidden_actions_are_blocked_and_reported(code, blocked):
    res = run_python(code, FAST)
    assert res.returncode != 0
    assert res.blocked and res.blocked[0] == blocked
    assert f"[blocked by the sandbox: {blocked}" in res.report()


@pytest.mark.parametrize("code, blocked", [
    ("import sys\nm = sys.modules['__main__']\nm._DENY_PREFIX = ()\nm._DENY_IMPORT = set()\nimport socket",
     "import socket"),
    ("import os.path\nos.path.realpath = lambda p: os.getcwd()\nopen('/tmp/forge-sandbox-patched', 'w')",
     "write outside the working directory: /tmp/forge-sandbox-patched"),
    ("import gc\nprint([f for f in gc.get_objects() if callable(f)][:1])", "import gc"),
    ("import builtins\nbuiltins.isinstance = lambda a, b: False\nbuiltins.any = lambda it: False\n"
     "open('/tmp/forge-sandbox-patched', 'w')", "write outside the working directory: /tmp/forge-sandbox-patched"),
    ("import os\nroot = os.getcwd()\nos.getcwd = lambda: root\nos.chdir('/tmp')\nopen('forge-sandbox-patched', 'w')",
     "os.chdir"),
    ("import os\nos.symlink('/tmp/forge-sandbox-patched', 'link')",
     "os.symlink outside the working directory: /tmp/forge-sandbox-patched"),
], ids=["main-globals", "patched-realpath", "gc", "patched-builtins", "chdir", "symlink-out"])
def test_the_rules_cannot_be_switched_off_from_python(code, blocked):
    res = run_python(code, FAST)
    assert res.blocked == [blocked]
    assert not os.path.exists("/tmp/forge-sandbox-patched")


def test_tempfile_and_home_point_into_the_folder():
    res = run_python("import os, tempfile\nprint(os.path.dirname(tempfile.mkstemp()[1]) == os.getcwd() == os.environ['HOME'])", FAST)
    assert res.stdout.strip() == "True", res.stderr


@pytest.mark.parametrize("target", ["/tmp/forge-sandbox-escape-{}", "../forge-sandbox-escape-{}"],
                         ids=["absolute", "relative"])
def test_write_outside_the_folder_is_blocked(target):
    path = target.format(uuid.uuid4().hex)
    res = run_python(f"open({path!r}, 'w').write('x')", FAST)
    assert res.blocked and res.blocked[0].startswith("write outside the working directory")
    assert not os.path.exists(os.path.join("/tmp", os.path.basename(path)))


@pytest.mark.parametrize("code, limit", [
    ("while True:\n    pass", "cpu"),
    ("import time\ntime.sleep(60)", "wall"),
    ("x = bytearray(1 << 30)", "memory"),
    ("while True:\n    print('x' * 1000)", "output"),
], ids=["cpu", "wall", "memory", "output"])
def test_limits_stop_runaway_code(code, limit):
    # A long wall limit for the others: on a loaded CI core one CPU second can take several.
    res = run_python(code, FAST if limit == "wall" else SandboxLimits(wall_s=30.0, cpu_s=1, memory_mb=256, output_bytes=64 << 10))
    assert res.limit == limit
    assert f"[stopped: {limit} limit]" in res.report()


@pytest.mark.skipif(not network_namespace_available(), reason="this host has no unprivileged user namespaces")
def test_network_namespace_has_no_interfaces_but_loopback():
    res = run_python("print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))", FAST)
    assert res.isolated_network and res.stdout.strip() == "['lo']"


def test_env_tool_reports_a_blocked_socket():
    env = PythonEnv()
    env.reset(seed=0)
    code = "import socket\nprint('reached ' + 'the network')"
    obs = env.step("<tool_call>" + json.dumps({"name": "run_python", "arguments": {"code": code}}) + "</tool_call>")[0]
    assert "blocked by the sandbox: import socket" in obs and "reached the network" not in obs
