"""A throwaway single-node SLURM cluster for tests, and the `slurm_cluster` pytest fixture.

munged, slurmctld and slurmd (and, with ``accounting=True``, mariadbd and slurmdbd) run as
plain child processes -- no systemd, nothing written to /etc -- with every file (config, munge
key and socket, state, spool, logs) in one temporary directory. SLURM commands are pointed at the
cluster through the ``SLURM_CONF`` environment variable: the fixture sets it in ``os.environ``
for the session (submitit shells out to sbatch/sacct/scancel with the inherited environment),
and ``cluster.env`` is the same environment for explicit subprocess calls.

The cluster: one node named after this machine (CPUs and memory as ``slurmd -C`` reports them),
one partition ``debug`` (Default=YES), ``select/cons_tres`` with ``CR_CPU`` so one-CPU jobs
share the node, ``proctrack/linuxproc`` and ``task/none`` (no cgroups needed), daemons running
as root, all ports on 127.0.0.1 and picked free at start. There is no accounting database by
default (``sacct`` fails with "Slurm accounting storage is disabled"); ``jobcomp/filetxt`` keeps
a record of every finished job, which `SlurmCluster.job_record` falls back to once slurmctld
has purged a job (``MinJobAge``).

Missing packages are installed with apt-get (root only, with a timeout). When the install or the
start fails the tests that use the fixture are skipped with the reason, or fail when ``CI=true``.

Environment knobs:
  KDJAX_SLURM_INSTALL=0          never run apt-get (skip instead)
  KDJAX_SLURM_INSTALL_TIMEOUT=N  seconds for the apt-get install (default 600)
  KDJAX_SLURM_KEEP=1             keep the cluster directory (config, logs) after teardown

Use it from a test module (no conftest needed; tests/ is on sys.path through tests/conftest.py):

    from slurm_cluster import slurm_cluster, slurm_cluster_session  # noqa: F401  (the fixtures)
    pytestmark = pytest.mark.slurm
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
ACCOUNTING_PACKAGES = ("slurmdbd", "mariadb-server")
_SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
_ACCOUNTING_BINARIES = ("slurmdbd", "mariadbd", "mariadb-install-db", "sacctmgr")

# Job states as squeue/scontrol print them (JobState=...) in SLURM 22.05.
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
     "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
)
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
     "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
)

_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w:/.\-]*)=")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started on this machine."""


def parse_records(text: str) -> list[dict[str, str]]:
    """Parse one-line ``Key=Value Key=Value ...`` records (``scontrol -o show job``, jobcomp/filetxt).

    Values may contain '=' (``TRES=cpu=1,node=1``) or be empty (``Power=``); a key starts after
    whitespace.
    """
    records = []
    for line in text.splitlines():
        marks = list(_KEY.finditer(line))
        if not marks:
            continue
        record = {}
        for here, nxt in zip(marks, marks[1:] + [None]):
            end = nxt.start() if nxt is not None else len(line)
            record[here.group(1)] = line[here.end():end].strip()
        records.append(record)
    return records


def ci_strict() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the daemon when the process that started it dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text[-lines:])


def missing_binaries(accounting: bool = False) -> list[str]:
    names = _SLURM_BINARIES + (_ACCOUNTING_BINARIES if accounting else ())
    return [b for b in names if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(accounting: bool = False, timeout: float | None = None) -> float:
    """Install the Debian packages when a binary is missing; returns the seconds spent (0 if none)."""
    if not missing_binaries(accounting):
        return 0.0
    packages = SLURM_PACKAGES + (ACCOUNTING_PACKAGES if accounting else ())
    if os.environ.get("KDJAX_SLURM_INSTALL", "1").strip().lower() in {"0", "false", "no"}:
        raise SlurmUnavailable(f"missing {missing_binaries(accounting)} and KDJAX_SLURM_INSTALL=0")
    if os.name != "posix" or os.geteuid() != 0:
        raise SlurmUnavailable(f"missing {missing_binaries(accounting)}; installing needs root "
                               f"(apt-get install {' '.join(packages)})")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"missing {missing_binaries(accounting)} and no apt-get to install them")
    timeout = float(timeout or os.environ.get("KDJAX_SLURM_INSTALL_TIMEOUT", 600))
    deadline = time.monotonic() + timeout
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
               "-o", "DPkg::Lock::Timeout=120", *packages]
    t0 = time.monotonic()
    # Straight install first (package lists are usually there); `apt-get update` only if it fails.
    for step in (None, ["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=120"]):
        if step is not None:
            run = _run_bounded(step, env, deadline)
            if run.returncode != 0:
                raise SlurmUnavailable(f"apt-get update failed (rc={run.returncode}): {run.stdout[-2000:]}")
        run = _run_bounded(install, env, deadline)
        if run.returncode == 0 and not missing_binaries(accounting):
            return time.monotonic() - t0
    raise SlurmUnavailable(
        f"apt-get install {' '.join(packages)} failed (rc={run.returncode}); still missing "
        f"{missing_binaries(accounting)}: {run.stdout[-2000:]}"
    )


def _run_bounded(cmd: list[str], env: dict, deadline: float) -> subprocess.CompletedProcess:
    left = deadline - time.monotonic()
    if left <= 0:
        raise SlurmUnavailable(f"install timed out before `{' '.join(cmd)}`")
    try:
        return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=left, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise SlurmUnavailable(f"`{' '.join(cmd)}` timed out after {left:.0f} s") from e


class SlurmCluster:
    """One-node SLURM cluster in a temporary directory. ``start()`` / ``stop()``, or use as a context manager."""

    cluster_name = "kdjaxtest"

    def __init__(self, *, min_job_age: int = 10, kill_wait: int = 5, cred_expire: int = 5, accounting: bool = False,
                 start_timeout: float = 60.0):
        self.min_job_age = min_job_age
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        self.accounting = accounting
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.conf: Path | None = None
        self.node = socket.gethostname().split(".")[0]
        self.cpus = 0
        self.timings: dict[str, float] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}
        self._job_serial = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """os.environ with SLURM_CONF pointing at this cluster."""
        assert self.conf is not None, "cluster not started"
        return dict(os.environ, SLURM_CONF=str(self.conf))

    @property
    def marker(self) -> str:
        return f"KDJAX_SLURM_CLUSTER={self.dir}"

    def start(self) -> "SlurmCluster":
        t0 = time.monotonic()
        atexit.register(self.stop)  # a script that forgets stop(); pytest teardown calls it anyway
        try:
            self._start()
        except SlurmUnavailable:
            self.stop()
            raise
        except Exception as e:  # noqa: BLE001  anything unexpected while starting is "unavailable" too
            self.stop()
            raise SlurmUnavailable(f"{type(e).__name__}: {e}") from e
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def _start(self) -> None:
        missing = missing_binaries(self.accounting)
        if missing:
            raise SlurmUnavailable(f"missing binaries {missing}")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs its daemons as root (SlurmUser=root); run as root")
        try:
            socket.gethostbyname(self.node)
        except OSError as e:
            raise SlurmUnavailable(f"hostname {self.node!r} does not resolve ({e}); "
                                   "add it to /etc/hosts (127.0.0.1)") from e
        self.dir = Path(tempfile.mkdtemp(prefix="kdjax-slurm-"))
        d = self.dir
        d.chmod(0o755)  # munged insists that every directory above its socket is world-executable
        for sub in ("run", "state", "spool", "log", "jobs", "munge"):
            (d / sub).mkdir()
        (d / "munge").chmod(0o700)
        self._env0 = dict(os.environ, KDJAX_SLURM_CLUSTER=str(d))

        # munged with its own key and socket, so a system munged (if any) is left alone.
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket = d / "run" / "munge.sock"
        self._spawn("munged", ["munged", "--foreground", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={d / 'run' / 'munged.pid'}", f"--seed-file={d / 'munge' / 'seed'}",
                               f"--log-file={d / 'log' / 'munged.log'}"])
        self._wait("munged socket", lambda: self.munge_socket.exists(), ["munged"], 10)

        self.ctld_port, self.slurmd_port, self.dbd_port, self.db_port = _free_ports(4)
        node_hw = self._node_hardware()
        self.conf = d / "slurm.conf"
        self.conf.write_text(self.slurm_conf_text(node_hw))
        if self.accounting:
            self._start_accounting()

        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait("slurmctld port", lambda: _port_open(self.ctld_port), ["slurmctld"], self.start_timeout)
        self._wait(f"node {self.node} idle", self._node_idle, ["slurmctld", "slurmd"], self.start_timeout)

    def _node_hardware(self) -> str:
        out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30, env=self._env0)
        first = out.stdout.splitlines()[0] if out.stdout else ""
        rec = parse_records(first)
        if out.returncode != 0 or not rec or "CPUs" not in rec[0]:
            raise SlurmUnavailable(f"`slurmd -C` failed (rc={out.returncode}): {out.stdout}{out.stderr}")
        hw = rec[0]
        self.cpus = int(hw["CPUs"])
        self.real_memory_mb = int(hw.get("RealMemory", 1))
        keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
        return " ".join(f"{k}={hw[k]}" for k in keys if k in hw)

    def slurm_conf_text(self, node_hw: str) -> str:
        d = self.dir
        if self.accounting:
            accounting = [
                "AccountingStorageType=accounting_storage/slurmdbd",
                "AccountingStorageHost=127.0.0.1",
                f"AccountingStoragePort={self.dbd_port}",
                "# munge socket for slurmctld <-> slurmdbd (AuthInfo is not used for it; default /run/munge/munge.socket.2)",
                f"AccountingStoragePass={self.munge_socket}",
                "JobAcctGatherType=jobacct_gather/linux",
            ]
        else:
            accounting = ["AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none"]
        lines = [
            "# Written by kdjax tests/slurm_cluster.py: a single-node test cluster, loopback only.",
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire (default 120 s) is also how long a requeued job is held (Reason=BeginTime): the
            # revoked credential must expire on slurmd first, or the restart fails "Job credential revoked"
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/run/slurmctld.pid",
            f"SlurmdPidFile={d}/run/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            *accounting,
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={d}/log/jobcomp.txt",
            "SchedulerType=sched/backfill",
            # batch_sched_delay (default 3 s) defers starting a just-submitted batch job; the main and
            # backfill loops (default every 60 s / 30 s) are what start a job whose BeginTime passed
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            f"MinJobAge={self.min_job_age}",
            f"KillWait={self.kill_wait}",
            "InactiveLimit=0",
            "Waittime=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} {node_hw} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    def _start_accounting(self) -> None:
        d = self.dir
        data = d / "mysql"
        t0 = time.monotonic()
        run = subprocess.run(["mariadb-install-db", "--user=root", f"--datadir={data}", "--skip-test-db",
                              "--auth-root-authentication-method=normal"],
                             capture_output=True, text=True, timeout=120, env=self._env0)
        if run.returncode != 0:
            raise SlurmUnavailable(f"mariadb-install-db failed: {run.stdout[-1500:]}{run.stderr[-1500:]}")
        self.timings["mariadb_install_db_s"] = time.monotonic() - t0
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", "--user=root", f"--datadir={data}",
                                 f"--socket={d / 'run' / 'mysql.sock'}", f"--port={self.db_port}",
                                 "--bind-address=127.0.0.1", f"--pid-file={d / 'run' / 'mysql.pid'}",
                                 "--skip-grant-tables", "--skip-log-bin", "--innodb-buffer-pool-size=64M"])
        self._wait("mariadbd port", lambda: _port_open(self.db_port), ["mariadbd"], 60)
        # slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF; it must be 0600.
        dbd_conf = d / "slurmdbd.conf"
        dbd_conf.write_text(textwrap.dedent(f"""\
            AuthType=auth/munge
            AuthInfo=socket={self.munge_socket}
            DbdHost={self.node}
            DbdAddr=127.0.0.1
            DbdPort={self.dbd_port}
            SlurmUser=root
            LogFile={d}/log/slurmdbd.log
            PidFile={d}/run/slurmdbd.pid
            StorageType=accounting_storage/mysql
            StorageHost=127.0.0.1
            StoragePort={self.db_port}
            StorageUser=root
            StorageLoc=slurm_acct_db
            """))
        dbd_conf.chmod(0o600)
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait("slurmdbd port", lambda: _port_open(self.dbd_port), ["slurmdbd"], 60)
        self.timings["accounting_start_s"] = time.monotonic() - t0

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = self.dir / "log" / f"{name}.out"
        env = dict(self._env0)
        if self.conf is not None:
            env["SLURM_CONF"] = str(self.conf)
        with open(log, "ab") as fh:
            self._procs[name] = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 env=env, cwd=self.dir, start_new_session=True,
                                                 preexec_fn=_die_with_parent if os.name == "posix" else None)
        self._logs[name] = log

    def _wait(self, what: str, ready, procs: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name in procs:
                if self._procs[name].poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with rc={self._procs[name].returncode} while waiting "
                                           f"for {what}:\n{self.log_tail(name)}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}:\n"
                                       + "\n".join(self.log_tail(n) for n in procs))
            time.sleep(0.1)

    def _node_idle(self) -> bool:
        try:
            out = subprocess.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], capture_output=True, text=True,
                                 timeout=5, env=self.env)
        except subprocess.TimeoutExpired:
            return False
        state = out.stdout.strip()
        if state.startswith(("drain", "down", "fail")):
            detail = self.run("scontrol", "show", "node", self.node, check=False).stdout
            raise SlurmUnavailable(f"node {self.node} came up {state}: {detail}")
        return state == "idle"

    def log_tail(self, name: str, lines: int = 25) -> str:
        parts = [f"--- {name} output ---", _tail(self._logs.get(name, Path("/nonexistent")), lines)]
        daemon_log = self.dir / "log" / f"{name}.log" if self.dir else None
        if daemon_log is not None and daemon_log.exists():
            parts += [f"--- {daemon_log} ---", _tail(daemon_log, lines)]
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons, kill anything left that belongs to this cluster, remove the directory."""
        t0 = time.monotonic()
        atexit.unregister(self.stop)
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10).stdout.split()
                if ids:
                    self.run("scancel", *sorted(set(ids)), check=False, timeout=10)
                    deadline = time.monotonic() + self.kill_wait + 10
                    while time.monotonic() < deadline and self.run(
                            "squeue", "-h", "-t", "PD,R,CG,S", "-o", "%A", check=False, timeout=10).stdout.strip():
                        time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            proc = self._procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            # helpers in the daemon's own session (slurmscriptd under slurmctld)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._kill_leftovers()
        self._procs.clear()
        self.timings["stop_s"] = time.monotonic() - t0
        if self.dir is not None and os.environ.get("KDJAX_SLURM_KEEP", "") in {"", "0"}:
            shutil.rmtree(self.dir, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """Processes started for this cluster still alive: daemons and slurmstepd carry the marker variable,
        job processes carry SLURM_CONF=<our slurm.conf> from the submitting environment."""
        if self.dir is None:
            return []
        needles = [self.marker.encode()]
        if self.conf is not None:
            needles.append(f"SLURM_CONF={self.conf}".encode())
        me = os.getpid()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[-1].split()[0] == "Z":
                continue  # zombie: already dead, waiting for its parent
            if any(var in needles for var in environ):
                found.append(int(entry.name))
        return found

    def _kill_leftovers(self) -> None:
        for _ in range(50):
            pids = self.leftover_pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    # ------------------------------------------------------------------ commands
    def run(self, *argv: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM command against this cluster; text output."""
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=self.env, **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` rc={out.returncode}: {out.stdout}{out.stderr}")
        return out

    def sbatch(self, *args: str, script: str | None = None, wrap: str | None = None) -> str:
        """Submit; returns the job id (``<id>`` or, for arrays, the array job id). Output goes to
        ``<cluster dir>/jobs/%j.out`` unless an ``--output``/``-o`` is given."""
        argv = ["sbatch", "--parsable", *args]
        if not any(a.startswith(("--output", "-o")) for a in args):
            argv.append(f"--output={self.dir / 'jobs' / '%j.out'}")
        if wrap is not None:
            argv.append(f"--wrap={wrap}")
        elif script is not None:
            self._job_serial += 1
            path = self.dir / "jobs" / f"script_{self._job_serial}.sh"
            path.write_text(script)
            argv.append(str(path))
        out = self.run(*argv)
        return out.stdout.strip().split(";")[0]

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol -o show job <id>`` parsed (one record per array task); after slurmctld purged the job
        (MinJobAge), the jobcomp/filetxt records with that JobId (last one per job). [] if unknown."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if out.returncode == 0:
            return parse_records(out.stdout)
        if "Invalid job id" not in out.stderr + out.stdout:
            raise RuntimeError(f"scontrol show job {job_id}: {out.stdout}{out.stderr}")
        return self.jobcomp_records(job_id)

    def jobcomp_records(self, job_id: str | None = None) -> list[dict[str, str]]:
        path = self.dir / "log" / "jobcomp.txt"
        records = parse_records(path.read_text()) if path.exists() else []
        if job_id is None:
            return records
        last = {}
        for r in records:
            if r.get("JobId") == str(job_id) or r.get("ArrayJobId") == str(job_id):
                last[r["JobId"]] = r  # a requeued job has one record per run; keep the latest
        return list(last.values())

    def job_state(self, job_id: str) -> str | None:
        recs = self.job_records(job_id)
        return recs[0]["JobState"] if recs else None

    def wait_for(self, job_id: str, states=TERMINAL_STATES, timeout: float = 30.0) -> dict[str, str]:
        """Poll until the (non-array) job is in one of `states`; returns its record."""
        deadline = time.monotonic() + timeout
        rec: dict[str, str] = {}
        while time.monotonic() < deadline:
            recs = self.job_records(job_id)
            if recs:
                rec = recs[0]
                if rec.get("JobState") in states:
                    return rec
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout} s; last: {rec}")

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no job is pending or running (e.g. before a job that needs every CPU)."""
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-t", "PD,R,CG,S", "-o", "%A").stdout.strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still queued after {timeout} s:\n{self.run('squeue').stdout}")
            time.sleep(0.2)


def unavailable(reason: str) -> None:
    """Skip -- or, with CI=true, fail -- the requesting test."""
    if ci_strict():
        pytest.fail(f"SLURM test cluster unavailable (CI=true makes this a failure): {reason}", pytrace=False)
    pytest.skip(f"SLURM test cluster unavailable: {reason}")


@contextlib.contextmanager
def running_cluster(**kwargs):
    """Install if needed, start, yield the cluster, stop it (skip/fail via `unavailable`)."""
    cluster = SlurmCluster(**kwargs)
    reason = None
    try:
        cluster.timings["install_s"] = ensure_installed(accounting=kwargs.get("accounting", False))
        cluster.start()
    except SlurmUnavailable as e:
        cluster.stop()
        reason = str(e)
    if reason is not None:
        unavailable(reason)
    try:
        yield cluster
    finally:
        cluster.stop()
        print("\n[slurm_cluster] timings: " + ", ".join(f"{k}={v:.2f}s" for k, v in cluster.timings.items()))


def _activate(cluster: SlurmCluster, monkeypatch) -> SlurmCluster:
    # submitit (and anything else) calls sbatch/squeue/sacct with the inherited environment.
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster_session():
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def slurm_cluster(slurm_cluster_session, monkeypatch):
    """The session's single-node SLURM cluster without accounting (sacct fails); SLURM_CONF points
    at it for the duration of the test."""
    return _activate(slurm_cluster_session, monkeypatch)


@pytest.fixture(scope="session")
def slurm_cluster_accounting_session():
    with running_cluster(accounting=True) as cluster:
        yield cluster


@pytest.fixture
def slurm_cluster_accounting(slurm_cluster_accounting_session, monkeypatch):
    """Like `slurm_cluster`, plus mariadbd + slurmdbd so that sacct works (a separate cluster; ~5 s more
    to start, and ~30 s once for apt-get install slurmdbd mariadb-server)."""
    return _activate(slurm_cluster_accounting_session, monkeypatch)
