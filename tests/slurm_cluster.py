"""A real one-node Slurm cluster on 127.0.0.1 for the test suite: munged, slurmctld and slurmd.

Everything it writes (config, state, logs, munge socket) lives under one directory, on free
ports, so it neither needs nor touches /etc/slurm or a system munged. ``start_cluster`` installs
Debian's ``slurm-wlm`` and ``munge`` first when they are missing and this is a root Debian/Ubuntu
machine; otherwise it raises ``SlurmUnavailable`` with the reason (the tests skip on it, or fail
under ``MIDTRAIN_REQUIRE_SLURM=1``).

Also a script: ``python tests/slurm_cluster.py DIR`` starts a cluster, prints
``export SLURM_CONF=...`` and stays up until Ctrl-C (for trying ``midtrain slurm submit`` by hand).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = ("slurm-wlm", "munge")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why."""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, midtrain) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        # slurmd first (it reports to slurmctld), munged last (both authenticate through it).
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def install_if_missing() -> None:
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and this user is not root")
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and this is not Debian/Ubuntu")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, node: str, cpus: int, sock: Path) -> str:
    return f"""\
ClusterName=midtrain-test
# Job ids (and the ports and temp dirs a job derives from them) unlike any earlier cluster's
FirstJobId={random.randint(1000, 900000)}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=20
MinJobAge=600
SlurmdTimeout=60
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _wait_until(check, what: str, cluster: SlurmCluster, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in cluster.procs:
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{proc.args[0]} exited early\n{cluster.log_tail()}")
        if check():
            return
        time.sleep(0.3)
    raise SlurmUnavailable(f"timed out waiting for {what}\n{cluster.log_tail()}")


def start_cluster(root: Path) -> SlurmCluster:
    """Install if needed, configure and start the daemons; returns once the node is idle."""
    install_if_missing()
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd needs root")
    root = Path(root).resolve()
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    sock = root / "munge" / "munge.sock"
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, node, os.cpu_count() or 1, sock))
    cluster = SlurmCluster(root, conf, node)

    # munged refuses to run as root and checks its directories' owners: give it its own, and a
    # key of its own (so neither /etc/munge/munge.key nor a system munged is needed or touched).
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    for path in (key, root / "munge"):
        shutil.chown(path, "munge", "munge")
    os.chmod(key, 0o400)
    os.chmod(root / "munge", 0o755)
    os.chmod(root, 0o755)
    munged = [
        "munged",
        "--foreground",
        "--force",
        f"--socket={sock}",
        f"--pid-file={root}/munge/munged.pid",
        f"--log-file={root}/munge/munged.log",
        f"--seed-file={root}/munge/munged.seed",
        f"--key-file={key}",
    ]
    env = {**os.environ, "SLURM_CONF": str(conf)}
    quiet: dict = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    try:
        # Started as the munge user directly (no runuser in between), so stop() signals munged.
        as_munge = {"user": "munge", "group": "munge", "extra_groups": []}
        cluster.procs.append(subprocess.Popen(munged, **quiet, **as_munge))
        _wait_until(sock.exists, "munged's socket", cluster)
        cluster.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], **quiet))
        ping = ["scontrol", "ping"]
        _wait_until(lambda: _ok(ping, env) and "UP" in _out(ping, env), "slurmctld", cluster)
        cluster.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], **quiet))
        state = ["sinfo", "-h", "-N", "-o", "%t"]
        _wait_until(lambda: _out(state, env).strip() in ("idle", "mix"), "an idle node", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _ok(cmd: list[str], env: dict[str, str]) -> bool:
    return subprocess.run(cmd, env=env, capture_output=True, timeout=20).returncode == 0


def _out(cmd: list[str], env: dict[str, str]) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20).stdout


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/midtrain-slurm")
    running = start_cluster(target)
    print(f"export SLURM_CONF={running.conf}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the daemons on TERM too
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()
