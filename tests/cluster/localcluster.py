"""Drive ``cluster/local.sh`` (a 0-CPU head + 1-CPU worker nodes on this machine) and the
job server it hosts, for the multi-node tests and ``benchmarks/multinode_prune.py``.

Jobs go in through ``ray job submit`` (the CLI a user runs); their status and logs are
read back through the same job server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SH = ROOT / "cluster" / "local.sh"
RUNTIME_ENV = ROOT / "cluster" / "runtime_env.local.yaml"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_base_port(start: int = 6700, span: int = 90) -> int:
    """A GCS port such that it and the ports local.sh derives from it (up to +span) are free."""
    for base in range(start, start + 2000, 100):
        if all(_free(p) for p in range(base, base + span)):
            return base
    raise RuntimeError("no free port range for a local test cluster")


class LocalCluster:
    def __init__(self, state_dir: Path, *, base_port: int | None = None):
        self.port = base_port or free_base_port()
        self.dash = self.port + 95
        self.state = Path(state_dir)
        self.env = {
            **os.environ,
            "DEALREC_RAY_PORT": str(self.port),
            "DEALREC_DASHBOARD_PORT": str(self.dash),
            "DEALREC_LOCAL_CLUSTER_DIR": str(self.state),
            "DEALREC_RAY_TEMP_DIR": f"/tmp/dealrec-t{self.port}",
            "DEALREC_STOP_GRACE_S": "10",
            "RAY_AUTH_MODE": "disabled",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sh(self, *args: str, timeout: float = 300) -> str:
        r = subprocess.run(["bash", str(LOCAL_SH), *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"local.sh {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def start(self, n: int) -> None:
        self.sh("start", str(n))

    def add(self) -> None:
        self.sh("add")

    def kill(self, i: int) -> None:
        self.sh("kill", str(i))

    def stop(self) -> None:
        self.sh("stop", timeout=120)

    # -- jobs -----------------------------------------------------------------------
    def submit(self, job_args: list[str], *, submission_id: str, wait: bool) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", self.address,
               "--submission-id", submission_id, "--working-dir", str(ROOT), "--runtime-env", str(RUNTIME_ENV)]
        if not wait:
            cmd.append("--no-wait")
        cmd += ["--", "python", *job_args]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=ROOT, timeout=1500)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def wait_job(self, submission_id: str, *, timeout: float = 900, poll: float = 2.0,
                 until=None) -> str:
        """Wait until the job ends (or ``until()`` is true); return its status name."""
        c = self.client()
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = str(c.get_job_status(submission_id)).split(".")[-1]
            if st in ("SUCCEEDED", "FAILED", "STOPPED"):
                return st
            if until is not None and until():
                return "RUNNING"
            time.sleep(poll)
        raise TimeoutError(f"job {submission_id} still running after {timeout}s:\n{self.logs(submission_id)[-3000:]}")

    def logs(self, submission_id: str) -> str:
        return self.client().get_job_logs(submission_id)
