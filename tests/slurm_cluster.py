"""A real Slurm cluster on 127.0.0.1 for the launcher and sweep tests.

Debian's ``slurm-wlm``, ``slurmdbd``, ``munge`` and ``mariadb-server`` are installed when missing (apt-get, as
root). The daemons (munged, MariaDB, slurmdbd, slurmctld and two ``slurmd -N`` emulating two nodes) run in the
foreground as children of the test session, with all their state, sockets and logs in one temporary directory
and free ports, so two test sessions on one machine never collide and no system service is touched. They are
stopped by PID when the session ends. Accounting (slurmdbd) is part of the cluster because submitit and
``sweep.py status`` learn that a job failed or was cancelled only from ``sacct``.

The two nodes are named after names that resolve to this machine (``hostname -s`` and ``localhost``): fairseq and
submitit connect to the first node of a job by its Slurm node name.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from fairseq_expire.launch.sweep import parse_sacct_states

PACKAGES = ("slurm-wlm", "slurmdbd", "munge", "mariadb-server")
DAEMONS = ("munged", "mariadb-install-db", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sacct", "sacctmgr", "squeue", "scancel", "sinfo")
SYSTEM_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/bin:/bin"
PARTITION = "debug"
NODE_CPUS = 2
NODE_MEMORY_MB = 1024


class SlurmUnavailable(Exception):
    """This machine cannot install Slurm (not root, no apt-get, or the package mirror is unreachable)."""


def _which(name: str):
    return shutil.which(name, path=SYSTEM_PATH)


def missing_programs():
    return [name for name in DAEMONS + CLIENTS if _which(name) is None]


def install_slurm() -> None:
    """apt-get install the Slurm, munge and MariaDB packages if any program is missing.

    Raises :class:`SlurmUnavailable` only when the machine cannot install packages; services are kept from
    starting during the install (a ``policy-rc.d`` that denies them, when the machine has none).
    """
    missing = missing_programs()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"{', '.join(missing)} missing and not root: cannot apt-get install {PACKAGES}"
        )
    if _which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} missing and no apt-get to install {PACKAGES}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": SYSTEM_PATH}
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\n# written by fairseq-expire's tests while installing Slurm\nexit 101\n")
        policy.chmod(0o755)
    try:
        for command in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300"]
            + list(PACKAGES),
        ):
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                raise SlurmUnavailable(
                    f"`{' '.join(command)}` failed ({result.returncode}): {(result.stdout + result.stderr)[-1500:]}"
                )
    finally:
        if own_policy:
            policy.unlink()
    still_missing = missing_programs()
    if still_missing:
        raise SlurmUnavailable(f"installed {PACKAGES} but {', '.join(still_missing)} still missing")


def free_ports(count: int) -> list:
    """Distinct free ports (all sockets held open while choosing, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(condition, timeout: float, what: str, diagnose=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LocalSlurm:
    """Slurm with accounting on 127.0.0.1: one partition, two emulated nodes with 2 CPUs each."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host, "localhost"] if self.host != "localhost" else ["localhost", "ip6-localhost"]
        self.partition = PARTITION
        self.processes = {}
        self.conf = root / "etc" / "slurm.conf"
        names = ("mariadb", "slurmdbd", "slurmctld", *self.nodes)
        self.ports = dict(zip(names, free_ports(len(names))))
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "OMP_NUM_THREADS": "1",
            "PATH": bin_dir + os.pathsep + SYSTEM_PATH,
        }
        self.env.pop("PYTHONPATH", None)
        for variable in [name for name in self.env if name.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if variable != "SLURM_CONF":
                del self.env[variable]

    # --- configuration ------------------------------------------------------------------------------------------

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def _write_configs(self) -> None:
        for sub in ("etc", "munge", "state", "log", "mysql", *(f"spool/{name}" for name in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)  # munged requires every directory above its socket to be searchable by all
        (self.root / "munge").chmod(0o711)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        # cred_expire is also how long a requeued job waits before it may start again (default 120 s)
        ctld_auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket},cred_expire=10\n"
        nodes = "".join(
            f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={self.ports[name]} "
            f"CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} State=UNKNOWN\n"
            for name in self.nodes
        )
        self.conf.write_text(
            "ClusterName=fxtest\n"
            f"SlurmctldHost={self.host}(127.0.0.1)\n"
            f"SlurmctldPort={self.ports['slurmctld']}\n"
            "SlurmUser=root\nSlurmdUser=root\n" + ctld_auth + "CredType=cred/munge\n"
            f"StateSaveLocation={self.root}/state\n"
            f"SlurmdSpoolDir={self.root}/spool/%n\n"
            f"SlurmctldPidFile={self.root}/state/slurmctld.pid\n"
            f"SlurmdPidFile={self.root}/state/slurmd.%n.pid\n"
            f"SlurmctldLogFile={self.root}/log/slurmctld.log\n"
            f"SlurmdLogFile={self.root}/log/slurmd.%n.log\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
            "AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
            f"AccountingStoragePort={self.ports['slurmdbd']}\nAccountingStoragePass={self.munge_socket}\n"
            "JobCompType=jobcomp/none\nMpiDefault=none\nMailProg=/bin/true\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\nSlurmdParameters=config_overrides\n"
            "ReturnToService=2\nKillWait=5\nMinJobAge=3600\nSchedulerParameters=sched_interval=2\n"
            "SlurmctldDebug=info\nSlurmdDebug=info\n"
            + nodes
            + f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )
        dbd_conf = self.conf.parent / "slurmdbd.conf"  # slurmdbd looks for it next to $SLURM_CONF
        dbd_conf.write_text(
            auth + "DbdHost=localhost\nDbdAddr=127.0.0.1\n"
            f"DbdPort={self.ports['slurmdbd']}\nSlurmUser=root\n"
            "StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={self.ports['mariadb']}\nStorageUser=root\nStorageLoc=slurm_acct_db\n"
            f"PidFile={self.root}/state/slurmdbd.pid\nLogFile={self.root}/log/slurmdbd.log\n"
        )
        dbd_conf.chmod(0o600)

    # --- daemons ------------------------------------------------------------------------------------------------

    def _spawn(self, name: str, command) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.processes[name] = subprocess.Popen(
            [str(part) for part in command],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal Ctrl-C goes to pytest only, whose teardown stops them in order
        )
        log.close()

    def _check_alive(self) -> None:
        dead = {name: proc.returncode for name, proc in self.processes.items() if proc.poll() is not None}
        if dead:
            raise RuntimeError(f"Slurm test daemons exited: {dead}\n{self.diagnostics()}")

    def start(self) -> "LocalSlurm":
        self._write_configs()
        mysql = self.root / "mysql"
        innodb = ["--innodb-log-file-size=8M", "--innodb-buffer-pool-size=32M"]
        install = subprocess.run(
            [_which("mariadb-install-db"), "--no-defaults", f"--datadir={mysql}", "--user=root"]
            + ["--auth-root-authentication-method=normal", "--skip-test-db"]
            + innodb,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if install.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{install.stdout}\n{install.stderr}")
        self._spawn(
            "munged",
            [_which("munged"), "--foreground", f"--socket={self.munge_socket}"]
            + [f"--key-file={self.root}/munge/munge.key", f"--pid-file={self.root}/munge/munged.pid"]
            + [f"--seed-file={self.root}/munge/munged.seed", f"--log-file={self.root}/log/munged.log"],
        )
        self._spawn(
            "mariadbd",
            [_which("mariadbd"), "--no-defaults", f"--datadir={mysql}", f"--socket={self.root}/mysql.sock"]
            + [f"--port={self.ports['mariadb']}", "--bind-address=127.0.0.1", "--user=root"]
            + [f"--pid-file={self.root}/state/mariadb.pid", f"--log-error={self.root}/log/mariadb.log"]
            + innodb,
        )
        wait_for(lambda: self.munge_socket.exists(), 30, "munged", self.diagnostics)
        wait_for(lambda: port_open(self.ports["mariadb"]), 60, "MariaDB", self.diagnostics)
        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        wait_for(
            lambda: self._check_alive() or port_open(self.ports["slurmdbd"]), 60, "slurmdbd", self.diagnostics
        )
        self._spawn("slurmctld", [_which("slurmctld"), "-D"])
        wait_for(lambda: self._check_alive() or self.controller_answers(), 60, "slurmctld", self.diagnostics)
        for name in self.nodes:
            self._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-N", name])
        wait_for(
            lambda: self._check_alive() or self.idle_nodes() == len(self.nodes),
            60,
            "idle nodes",
            self.diagnostics,
        )
        wait_for(lambda: self._check_alive() or self.cluster_registered(), 60, "accounting", self.diagnostics)
        return self

    def stop(self) -> None:
        """Cancel what is left, then stop every daemon by its PID (slurmd first, munged last)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition", self.partition, check=False)
            try:
                wait_for(
                    lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 30, "cancelled jobs"
                )
            except RuntimeError as error:
                warnings.warn(f"Slurm test cluster: {error}")
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self.processes.clear()

    # --- queries ------------------------------------------------------------------------------------------------

    def run(self, *command, check: bool = True, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, sacct, ...) against this cluster."""
        result = subprocess.run(
            [str(part) for part in command],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def controller_answers(self) -> bool:
        result = self.run("scontrol", "ping", check=False)
        return result.returncode == 0 and "UP" in result.stdout

    def idle_nodes(self) -> int:
        result = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        return sum(line.split()[-1] == "idle" for line in result.stdout.splitlines() if line.strip())

    def cluster_registered(self) -> bool:
        result = self.run("sacctmgr", "-n", "-P", "show", "cluster", "format=cluster", check=False)
        return "fxtest" in result.stdout.split()

    def job_state(self, job_id: str) -> str:
        """The accounting state of a job (array element ``123_4`` or plain ``123``), e.g. COMPLETED, FAILED."""
        # Ask for the whole array: a pending element cancelled before Slurm split it off is recorded as
        # ``123_[4]``, which ``sacct -j 123_4`` does not find (``sweep.py status`` asks the same way).
        base = job_id.split("_")[0]
        result = self.run("sacct", "-n", "-P", "-X", "-j", base, "--format", "JobID,State", check=False)
        return parse_sacct_states(result.stdout).get(job_id, "UNKNOWN")

    def wait_job(self, job_id: str, timeout: float = 300) -> str:
        """Wait until a job has ended; its final state."""
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL")
        state = {"now": "UNKNOWN"}

        def done():
            state["now"] = self.job_state(job_id)
            return state["now"] in ended

        wait_for(done, timeout, f"job {job_id} to end (state {state['now']})", self.diagnostics)
        return state["now"]

    def diagnostics(self) -> str:
        """Tails of the daemon logs and the queue, for assertion messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            text = log.read_text(errors="replace")[-1500:]
            if text.strip():
                parts.append(f"--- {log.name}\n{text}")
        return "\n".join(parts)


_SHARED = {"cluster": None, "users": 0, "unavailable": None}


def require_slurm_programs() -> None:
    """Install Slurm if needed; skip loudly (pytest skip and a warning) only when this machine cannot."""
    if _SHARED["unavailable"] is None:
        try:
            install_slurm()
            _SHARED["unavailable"] = ""
        except SlurmUnavailable as error:
            _SHARED["unavailable"] = str(error)
    if _SHARED["unavailable"]:
        message = f"REAL SLURM TESTS NOT RUN: this machine cannot install Slurm: {_SHARED['unavailable']}"
        warnings.warn(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def local_slurm():
    """One cluster per test session, shared by every module that imports this fixture."""
    require_slurm_programs()
    if _SHARED["users"] == 0:
        cluster = LocalSlurm(Path(tempfile.mkdtemp(prefix="fx-slurm-")))
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        _SHARED["cluster"] = cluster
    _SHARED["users"] += 1
    try:
        yield _SHARED["cluster"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            _SHARED["cluster"].stop()
            shutil.rmtree(_SHARED["cluster"].root, ignore_errors=True)
            _SHARED["cluster"] = None


# --- what the launcher and sweep tests run on the cluster ---------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def tiny_training_args(data, updates: int = 20, *extra) -> list:
    """fairseq-train arguments of a tiny CPU run (no --save-dir: the launcher sets it)."""
    return [
        str(data),
        "--user-dir", "fairseq_expire",
        "--task", "language_modeling_with_memory",
        "--arch", "expire_span_lm_tiny",
        "--criterion", "expire_span_cross_entropy",
        "--tokens-per-sample", "16", "--batch-size", "2",
        "--optimizer", "adam", "--lr", "0.003",
        "--max-update", str(updates),
        "--cpu", "--seed", "1", "--num-workers", "0",
        "--no-progress-bar", "--log-format", "json", "--log-interval", "5",
        *map(str, extra),
    ]  # fmt: skip


def run_script(script: str, *args, env, timeout: float = 300, cwd=REPO) -> subprocess.CompletedProcess:
    """``python scripts/<script> args`` as a user runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Character-level data made with the real fairseq-preprocess: 6000 train and 1000 valid tokens."""
    from console import make_data_bin, repeating_text

    if "data" not in _SHARED:  # once per session, whichever module asks first
        directory = tmp_path_factory.mktemp("slurm_data")
        _SHARED["data"] = make_data_bin(
            directory, repeating_text(6000, 40, seed=1), repeating_text(1000, 40, seed=2)
        )
    return _SHARED["data"]
