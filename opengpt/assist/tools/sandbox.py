"""The Python sandbox: `run_python` runs untrusted code in a separate, contained process.

Three processes, all this file: the runner (the caller), a supervisor started as `python -I -S -B
sandbox.py CONFIG` with an empty environment in a new session, and the code, exec'd by a child of the
supervisor as a fresh `python -E -s -S -B main.py` (stdlib only; `files` importable next to it).
The isolation mode is probed once per process with a real run: "ns" when root, "userns" when not
(or root of a container where nobody is not mapped) but user namespaces are allowed, else "none".
What is enforced, and by what, in "ns" mode:

- wall time: the runner kills the supervisor's process group at `timeout` -> stopped "timeout".
- CPU time: RLIMIT_CPU (SIGXCPU, SIGKILL a second later) -> "cpu_time".
- memory: RLIMIT_AS (address space); allocations fail with MemoryError -> "memory".
- processes: RLIMIT_NPROC for uid nobody (65534), shared by concurrent sandboxes -> fork fails with
  BlockingIOError -> "processes".
- output: stdout and stderr together are cut at `max_output_bytes` -> "output_limit"; files at
  RLIMIT_FSIZE; the only writable places are /tmp and /dev/shm, tmpfs of `disk_mb` MiB each.
- cleanup: a new PID namespace whose init (the code's parent) dies with the supervisor
  (PR_SET_PDEATHSIG) and as soon as the code exits; the kernel then kills every process left in
  it, setsid() or not. The temporary directory is removed.
- network: a new network namespace; its only interface, loopback, is down.
- filesystem: a new mount namespace (private propagation): every mount remounted read-only, /proc
  of the new PID namespace, fresh tmpfs /tmp (the working directory is /tmp/<name>) and /dev/shm,
  /root and the caller's home covered by empty read-only tmpfs with only the Python installation
  bound back, read-only. World-readable files elsewhere (/etc, /usr, the repository) stay readable.
- privileges: the environment is PATH, HOME, TMPDIR, LANG only; setgid/setuid to nobody with no
  supplementary groups, so the code cannot signal the runner (it cannot even see it) or read
  root's files; an empty capability bounding set; PR_SET_NO_NEW_PRIVS (setuid binaries do not
  elevate). SysV IPC and the hostname are namespaced too.

"userns": the same namespaces, owned by a new user namespace where the code is uid 0 mapped onto
the caller's uid, with no capabilities. RLIMIT_NPROC then counts all of the caller's processes (and
binds nothing when that uid is the host's root), and files the caller owns outside its home and
/tmp stay readable (not writable).
"none" (logged as a warning): rlimits, the empty environment and, as root, the uid drop when nobody
can read the interpreter (else uid 0 without capabilities, which ignores RLIMIT_NPROC and owns
root's files: a fork bomb lasts until the timeout). The network is blocked only in Python (import
socket fails; ctypes gets round it), the filesystem is the host's, and processes that call setsid()
outlive the run until their CPU limit; unprivileged, the caller's files and environment
(/proc/PID/environ) are readable. No seccomp filter: no maintained Python binding is among our
dependencies, and the namespaces cover what it would be used for here.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

logger = logging.getLogger(__name__)

NOBODY = 65534
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
# per-mount flags that a remount must repeat (inside a user namespace the kernel refuses to clear them)
_KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
# Python-level network block for mode "none", run before the user's script
_NO_SOCKETS = "import sys, runpy; sys.modules['_socket'] = sys.modules['socket'] = None; " \
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


@dataclasses.dataclass(slots=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # -N when killed by signal N, None when the runner killed it
    stopped: str | None  # None, or why it ended early: "timeout", "cpu_time", "memory", ...
    duration_s: float
    mode: str  # which isolation was in force: "ns", "userns" or "none" (see module docstring)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_python(code: str, *, timeout: float = 10.0, cpu_seconds: float = 5.0, memory_mb: int = 512,
               max_processes: int = 64, max_output_bytes: int = 1 << 20, disk_mb: int = 64,
               files: dict[str, str | bytes] | None = None, stdin: str = "") -> SandboxResult:
    """Run `code` as a script in the sandbox; `files` (relative paths) are placed next to it."""
    limits = dict(cpu_seconds=cpu_seconds, memory_mb=memory_mb, max_processes=max_processes, disk_mb=disk_mb)
    return _run(_probe_mode(), code, _checked(files or {}), stdin, timeout, max_output_bytes, limits)


@functools.lru_cache(maxsize=None)
def _probe_mode() -> str:
    """The namespaces this machine allows, tried once with a real run; warn when the sandbox must do without."""
    why = []
    for mode in ("ns", "userns") if os.geteuid() == 0 else ("userns",):  # root of a container may lack nobody
        try:
            r = _run(mode, "pass", {}, "", 30.0, 1 << 16, dict(cpu_seconds=5, memory_mb=512, max_processes=64,
                                                                disk_mb=1))
            if r.exit_code == 0:
                return mode
            why.append(f"{mode}: exit {r.exit_code}: {r.stderr[-200:]}")
        except (RuntimeError, OSError) as e:
            why.append(f"{mode}: {e}")
    logger.warning("sandbox: no namespaces (%s): network blocked only in Python, host filesystem, weaker cleanup "
                   "(see opengpt.assist.tools.sandbox)", "; ".join(why))
    return "none"


@functools.lru_cache(maxsize=None)
def _drop_uid(mode: str) -> bool:
    """As root, run the code as nobody; without a mount namespace only if nobody can read the interpreter."""
    if os.geteuid() != 0 or mode == "userns":
        return False
    if mode == "ns" or _others_can_read(sys.base_prefix):
        return True
    logger.warning("sandbox: running untrusted code as root without capabilities (nobody cannot read %s)",
                   sys.base_prefix)
    return False


def _run(mode: str, code: str, files: dict, stdin: str, timeout: float, max_output: int, limits: dict) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="opengpt-sandbox-")
    status_r, status_w = os.pipe()
    try:
        _write_files(workdir, {**files, "main.py": code})
        if drop_uid := _drop_uid(mode):
            _chown_tree(workdir, NOBODY)
        cfg = dict(limits, mode=mode, drop_uid=drop_uid, status_fd=status_w, name=os.path.basename(workdir),
                   masks=sorted({"/root", os.path.expanduser("~")}))
        start = time.monotonic()
        with tempfile.TemporaryFile() as stdin_file:  # a file, not a pipe: no writer to deadlock
            stdin_file.write(stdin.encode())
            stdin_file.seek(0)
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(cfg)],
                                    stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={},
                                    cwd=workdir, pass_fds=(status_w,), start_new_session=True)
        os.close(status_w)
        status_w = -1
        out, err, stopped = _collect(proc, timeout, max_output)
        duration = time.monotonic() - start
        os.set_blocking(status_r, False)
        try:  # written before the supervisor exited, well under a pipe's capacity
            reports = [json.loads(line) for line in os.read(status_r, 1 << 16).decode().splitlines()]
        except BlockingIOError:
            reports = []
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
    if errors := [r["error"] for r in reports if "error" in r]:
        raise RuntimeError(f"sandbox setup failed: {errors[0]}")
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    report = next((r for r in reports if "cpu_s" in r), None)
    exit_code = None if report is None else report["exit_code"]
    if stopped is None:  # no report: the supervisor died without one (mode "none": the code may kill it)
        stopped = "sandbox_error" if report is None else _why_stopped(report, stderr, limits["cpu_seconds"])
    return SandboxResult(stdout, stderr, exit_code, stopped, duration, mode)


def _why_stopped(report: dict, stderr: str, cpu_seconds: float) -> str | None:
    sig = -report["exit_code"] if report["exit_code"] < 0 else None
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and report["cpu_s"] >= cpu_seconds):
        return "cpu_time"
    if sig == signal.SIGXFSZ:
        return "file_size"
    if sig:
        return f"signal:{signal.Signals(sig).name}"
    if report["exit_code"] != 0:  # the interpreter's last words; any process of the run may have said them
        tail = stderr.splitlines()[-20:]
        if any(line.startswith("MemoryError") for line in tail):
            return "memory"
        if any(line.startswith("BlockingIOError: [Errno 11]") for line in tail):
            return "processes"
    return None


def _collect(proc: subprocess.Popen, timeout: float, limit: int) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr up to `limit` bytes together until both close, the time is up or output overflows."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    deadline, exited_at, stopped, total = time.monotonic() + timeout, None, None, 0
    while sel.get_map() and stopped is None:
        now = time.monotonic()
        if now >= deadline:
            stopped = "timeout"
            break
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 0.5:  # mode "none": a leftover holds the pipes
            break
        for key, _ in sel.select(min(deadline - now, 0.1)):
            data = os.read(key.fd, 1 << 16)
            if not data:
                sel.unregister(key.fd)
                continue
            room = limit - total
            bufs[key.fd] += data[:room]
            total += min(len(data), room)
            if len(data) > room:
                stopped = "output_limit"
                break
    sel.close()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the supervisor's session; the PID namespace goes with it
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), stopped


def _checked(files: dict[str, str | bytes]) -> dict[str, str | bytes]:
    for name in files:
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or "" in parts or name == "main.py":
            raise ValueError(f"sandbox file name must be relative, without '..', and not main.py: {name!r}")
    return files


def _write_files(root: str, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)


def _chown_tree(root: str, uid: int) -> None:
    for top, dirs, names in os.walk(root):
        for p in [top, *(os.path.join(top, n) for n in dirs + names)]:
            os.chown(p, uid, uid)


def _others_can_read(path: str) -> bool:
    """Whether uid nobody can reach `path`: every directory on the way needs o+rx."""
    path = pathlib.Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & 0o005 == 0o005 for p in [path, *path.parents])


# ---- supervisor side: runs as `python -I -S -B sandbox.py CONFIG`, stdlib only, single-threaded ----

_libc = functools.cache(lambda: ctypes.CDLL(None, use_errno=True))


def _sys(name: str, *args) -> int:
    ret = getattr(_libc(), name)(*args)
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args[:2]!r}: {os.strerror(err)}")
    return ret


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _sys("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def _unshare(mode: str) -> None:
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    _sys("unshare", flags | (CLONE_NEWUSER if mode == "userns" else 0))
    if mode == "userns":  # become root of the new namespace, mapped onto our own uid (all that is allowed)
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _isolate_fs(cfg: dict) -> str:
    """In the new mount namespace: everything read-only, fresh /proc, /tmp, /dev/shm; returns the workdir."""
    files = {}
    for root, _, names in os.walk("."):  # the runner's files, read before /tmp is covered
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                files[os.path.normpath(os.path.join(root, n))] = f.read()
    uid = NOBODY if cfg["drop_uid"] else 0
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # first: nothing below may propagate to the host
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4:6] for line in f]
    for target, opts in mounts:
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), target)
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | sum(_KEPT_FLAGS.get(o, 0) for o in opts.split(","))
        try:
            _mount(None, target, None, flags)
        except OSError:  # e.g. a mount shadowed by another one; what it holds is not reachable anyway
            pass
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(sys.executable))}
    needed = {d for d in needed if not any(d.startswith(o + "/") for o in needed)}
    covers = [(h, "size=1m,mode=755", True) for h in cfg["masks"]]  # homes: empty and read-only
    covers += [(d, f"size={cfg['disk_mb']}m,mode=1777", False) for d in ("/tmp", "/dev/shm")]
    for target, data, read_only in covers:
        if target == "/" or not os.path.isdir(target):
            continue
        keep = {d: os.open(d, os.O_PATH) for d in needed if d.startswith(target.rstrip("/") + "/")}
        _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, data)
        for d, fd in keep.items():  # the interpreter may live under it (pyenv in /root): bind just that back
            os.makedirs(d, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", d, None, MS_BIND)
            _mount(None, d, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.close(fd)
        if read_only:
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    workdir = f"/tmp/{cfg['name']}"
    os.mkdir(workdir, 0o700)
    _write_files(workdir, files)
    _chown_tree(workdir, uid)
    os.chdir(workdir)
    return workdir


def _exec_user(cfg: dict, workdir: str) -> None:
    """The child that becomes the user's script: limits, no privileges, then exec."""
    import resource

    cpu = max(1, int(cfg["cpu_seconds"] + 0.999))
    for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (cfg["memory_mb"] << 20,) * 2),
                       (resource.RLIMIT_NPROC, (cfg["max_processes"],) * 2), (resource.RLIMIT_CORE, (0, 0)),
                       (resource.RLIMIT_FSIZE, (cfg["disk_mb"] << 20,) * 2), (resource.RLIMIT_NOFILE, (256, 256))):
        resource.setrlimit(res, value)
    _sys("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    for cap in range(64):  # an empty bounding set: exec as (namespace) root gains no capability
        try:
            _sys("prctl", PR_CAPBSET_DROP, cap, 0, 0, 0)
        except OSError:
            break  # EINVAL past the last capability the kernel knows; EPERM when we have none to drop
    if cfg["drop_uid"]:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    _sys("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.set_inheritable(cfg["status_fd"], False)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    args = ["-c", _NO_SOCKETS, "main.py"] if cfg["mode"] == "none" else ["main.py"]
    os.execve(sys.executable, [sys.executable, "-E", "-s", "-S", "-B", *args], env)


def _report(cfg: dict, **fields) -> None:
    os.write(cfg["status_fd"], (json.dumps(fields) + "\n").encode())


def _supervise(cfg: dict, workdir: str):
    """Fork the user's script, reap everything, report how the script ended on the status pipe."""
    pid = os.fork()
    if pid == 0:
        try:
            _exec_user(cfg, workdir)
        except BaseException as e:
            _report(cfg, error=repr(e))
        os._exit(125)
    while True:  # as a namespace's init we also reap orphans
        got, status, ru = os.wait4(-1, 0)
        if got == pid:
            break
    _report(cfg, exit_code=os.waitstatus_to_exitcode(status), cpu_s=ru.ru_utime + ru.ru_stime)
    os._exit(0)  # as init: the kernel now kills whatever the script left running


def _init(cfg: dict, alive_r: int):
    """PID 1 of the new namespace: dies with the supervisor; isolates the filesystem, then supervises."""
    try:
        _sys("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.set_blocking(alive_r, False)
        with contextlib.suppress(BlockingIOError):
            if os.read(alive_r, 1) == b"":  # EOF: the supervisor died before PDEATHSIG was armed
                os._exit(1)
        os.close(alive_r)
        workdir = _isolate_fs(cfg)
    except BaseException as e:
        _report(cfg, error=repr(e))
        os._exit(1)
    _supervise(cfg, workdir)


def _bootstrap(argv: list[str]) -> None:
    cfg = json.loads(argv[0])
    if cfg["mode"] == "none":
        _supervise(cfg, os.getcwd())
    _unshare(cfg["mode"])
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        _init(cfg, alive_r)
    os.close(alive_r)
    os.waitpid(pid, 0)


if __name__ == "__main__":
    _bootstrap(sys.argv[1:])
