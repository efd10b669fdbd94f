"""The Python sandbox against a hostile suite: each attack must end with a clear, contained result."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from opengpt.assist.tools.sandbox import SandboxResult, _probe_mode, run_python

REPO = Path(__file__).resolve().parents[2]
MODE = _probe_mode()
# without namespaces the filesystem, network and other processes are the host's: only limits hold
isolated = pytest.mark.skipif(MODE == "none", reason="no namespaces here: the sandbox runs degraded")


def _uid_procs(uid: int) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                pids.add(int(entry))
        except FileNotFoundError:
            pass
    return pids


def test_normal_code_returns_stdout_stderr_and_exit_code():
    r = run_python("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)")
    assert (r.stdout, r.stderr, r.exit_code, r.stopped) == ("out\n", "err\n", 3, None)
    assert r.mode == MODE and r.duration_s > 0
    assert json.loads(json.dumps(r.to_dict()))["stdout"] == "out\n"
    assert isinstance(r, SandboxResult)


def test_syntax_error():
    r = run_python("def f(:\n  pass")
    assert r.exit_code == 1 and r.stopped is None
    assert "SyntaxError" in r.stderr


def test_files_and_stdin_are_given_to_the_code():
    code = "import sys, helper\nprint(open('data/in.txt').read(), helper.X, sys.stdin.read().upper())"
    r = run_python(code, files={"data/in.txt": "abc", "helper.py": "X = 42"}, stdin="hello")
    assert r.stdout == "abc 42 HELLO\n", r.stderr
    for bad in ("../x", "/etc/x", "main.py", "a//b"):
        with pytest.raises(ValueError):
            run_python("pass", files={bad: ""})


def test_the_environment_is_empty(monkeypatch):
    monkeypatch.setenv("OPENGPT_SECRET", "s3cret")
    r = run_python("import os\nprint(sorted(os.environ))")
    assert r.stdout == "['HOME', 'LANG', 'PATH', 'TMPDIR']\n", r.stderr


@isolated
def test_the_parent_environment_cannot_be_read():
    # /proc/PID/environ shows the environment a process was exec'd with, so the secret goes in at exec
    code = (
        "import os\n"
        "for pid in [os.getppid(), *os.listdir('/proc')]:\n"
        "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except (OSError, ValueError) as e:\n        print(type(e).__name__)\n"
    )
    runner = (  # the module by path: importing opengpt would import torch, seconds for nothing
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('sandbox', {str(REPO / 'opengpt/assist/tools/sandbox.py')!r})\n"
        "sandbox = sys.modules['sandbox'] = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(sandbox)\n"
        f"print(json.dumps(sandbox.run_python({code!r}).to_dict()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", runner], env={**os.environ, "OPENGPT_SECRET": "s3cret"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["exit_code"] == 0, r["stderr"]
    assert "s3cret" not in r["stdout"] + r["stderr"]
    assert "PermissionError" in r["stdout"] or MODE == "userns"  # userns: the parent is the namespace's init


@isolated
def test_private_files_of_the_host_cannot_be_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    secret.chmod(0o600)
    paths = [str(secret), os.path.expanduser("~/.ssh/id_rsa"), os.path.expanduser("~/.bashrc"), "/root/.bashrc"]
    if MODE == "ns" or os.stat("/etc/shadow").st_uid != os.getuid():  # userns: the caller's own files stay readable
        paths.append("/etc/shadow")
    code = (
        f"for p in {paths!r}:\n"
        "    try:\n        open(p).read(); print('LEAK', p)\n"
        "    except OSError as e:\n        print('denied', p, type(e).__name__)\n"
    )
    r = run_python(code)
    assert r.exit_code == 0, r.stderr
    assert "LEAK" not in r.stdout and "TOPSECRET" not in r.stdout
    assert r.stdout.count("denied") == len(paths)


@isolated
def test_nothing_outside_the_workdir_can_be_written(tmp_path):
    tmp_path.chmod(0o700)
    tag = uuid.uuid4().hex
    targets = [tmp_path / f"evil_{tag}", REPO / f"evil_{tag}", Path(f"/root/evil_{tag}"), Path(f"/tmp/evil_{tag}"),
               Path(f"/var/tmp/evil_{tag}")]
    code = (
        "import os\nopen('inside.txt', 'w').write('ok'); print('inside', os.path.exists('inside.txt'))\n"
        f"for p in {[str(t) for t in targets]!r}:\n"
        "    try:\n        open(p, 'w').write('x'); print('wrote', p)\n"
        "    except OSError as e:\n        print('refused', type(e).__name__)\n"
        "print(os.getcwd())\n"
    )
    try:
        r = run_python(code)
        assert r.exit_code == 0, r.stderr
        assert "inside True" in r.stdout
        assert not any(t.exists() for t in targets)
        # /tmp inside is a private tmpfs: what the code wrote there never reaches the host
        assert not Path(r.stdout.splitlines()[-1]).exists()  # and the host workdir is gone too
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


@isolated
def test_no_network_even_to_loopback():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    try:
        r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
        assert r.exit_code == 1 and "connected" not in r.stdout
        assert "Network is unreachable" in r.stderr
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


@isolated
def test_ctypes_cannot_regain_privileges_or_escape():
    tag = uuid.uuid4().hex
    outside = [Path(f"/tmp/pwned_{tag}"), REPO / f"pwned_{tag}"]
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None)\nlibc.setuid(0)\n"
        "caps = [l for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))]\n"
        "print(os.geteuid() == 0 and os.getuid() != 0, [l.split()[1] for l in caps])\n"
        f"libc.system(b'touch {outside[0]} {outside[1]}')\n"
    )
    try:
        r = run_python(code)
        assert r.exit_code == 0, r.stderr
        assert r.stdout.splitlines()[0] == "False ['0000000000000000', '0000000000000000', '0000000000000000']"
        assert not any(p.exists() for p in outside)
    finally:
        for p in outside:
            p.unlink(missing_ok=True)


@isolated
def test_the_parent_and_other_processes_cannot_be_killed():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        code = (  # -1: every process it may signal (Linux leaves out the caller and init)
            "import os, signal\n"
            f"for pid in (os.getppid(), {os.getpid()}, {bystander.pid}, -1):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL); print('sent')\n"
            "    except OSError as e:\n        print(type(e).__name__)\n"
        )
        r = run_python(code)
        assert r.exit_code == 0, r.stderr
        if MODE == "ns":  # the parent is root's init of the namespace; the rest are not visible from it
            assert r.stdout.split() == ["PermissionError"] + ["ProcessLookupError"] * 3
        assert bystander.poll() is None  # and this test process is still here to assert it
    finally:
        bystander.kill()
        bystander.wait()


@isolated
@pytest.mark.skipif(MODE == "userns" and open("/proc/self/uid_map").read().split()[:2] == ["0", "0"],
                    reason="RLIMIT_NPROC does not bind the host's root, which this user namespace maps uid 0 to")
def test_fork_bomb_is_contained():
    before = _uid_procs(65534)
    start = time.monotonic()
    r = run_python("import os\nwhile True:\n    os.fork()", timeout=10, max_processes=32)
    assert r.stopped == "processes", (r.stopped, r.stderr[-500:])
    assert "BlockingIOError" in r.stderr and time.monotonic() - start < 10
    deadline = time.monotonic() + 2
    while _uid_procs(65534) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (_uid_procs(65534) - before)  # nothing of the run is left
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, text=True).stdout == "1\n"


@isolated
def test_processes_that_leave_the_session_die_with_the_run():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint(os.getpid())"
    before = _uid_procs(65534)
    r = run_python(code)
    assert r.exit_code == 0 and r.stopped is None
    assert not (_uid_procs(65534) - before)


def test_memory_bombs_raise_memory_error():
    r = run_python("x = bytearray(4 << 30)")
    assert (r.exit_code, r.stopped) == (1, "memory") and r.stderr.rstrip().endswith("MemoryError")
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10 << 20))", memory_mb=256)
    assert (r.exit_code, r.stopped) == (1, "memory")


def test_infinite_loop_hits_the_cpu_limit():
    r = run_python("while True:\n    pass", cpu_seconds=1, timeout=10)
    assert r.stopped == "cpu_time" and r.exit_code == -signal.SIGXCPU  # the CPU limit, not the 10 s wall limit


def test_sleeping_code_hits_the_wall_clock_limit():
    r = run_python("import time\ntime.sleep(60)", timeout=1)
    assert r.stopped == "timeout" and r.exit_code is None
    assert r.duration_s < 30  # stopped by the 1 s limit, far short of the 60 s sleep


def test_output_flood_is_cut():
    r = run_python("while True:\n    print('x' * 1000)", max_output_bytes=10_000)
    assert r.stopped == "output_limit"
    assert len(r.stdout.encode()) + len(r.stderr.encode()) <= 10_000 and r.stdout.startswith("x" * 1000)


def test_cli_json_and_exit_status(tmp_path):
    """`opengpt sandbox FILE --json` prints one JSON result; a stopped run exits 1."""
    script = tmp_path / "job.py"
    script.write_text("import os\nprint(os.getcwd() != %r)\n" % str(tmp_path))
    cmd = [sys.executable, "-m", "opengpt", "sandbox", str(script), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert (r["stdout"], r["exit_code"], r["stopped"]) == ("True\n", 0, None)
    loop = subprocess.run([sys.executable, "-m", "opengpt", "sandbox", "-", "--cpu-seconds", "1"],
                          input="while True:\n    pass\n", capture_output=True, text=True, timeout=120)
    assert loop.returncode == 1 and "stopped (cpu_time)" in loop.stderr
