"""core/slurm_dev.py: which cluster a resource's settings point at, and the CLI's status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app import slurm_dev

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_for_resource_settings() -> None:
    cluster = slurm_dev.cluster_for("http://127.0.0.1:16999", "/srv/slurm-x/etc/jwt_hs256.key")
    assert cluster.rest_port == 16999
    assert cluster.state_dir == Path("/srv/slurm-x")
    assert cluster.jwt_key == Path("/srv/slurm-x/etc/jwt_hs256.key")


def test_status_of_a_cluster_that_never_ran(tmp_path: Path) -> None:
    env = {"UWS_SLURM_DEV_DIR": str(tmp_path / "none"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "app.cli", "slurm-dev", "status"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert done.stdout.split("\n")[:4] == [f"{d}: stopped" for d in slurm_dev.DAEMONS]


def test_running_cluster_status_and_token(slurm_cluster) -> None:
    states = slurm_dev.status(slurm_cluster)
    assert all(states.values()), states
    # Pids are checked against the binary: a pid file naming another process is "stopped".
    fake = slurm_dev.DevCluster(state_dir=slurm_cluster.state_dir / "fake")
    fake.under("run").mkdir(parents=True)
    fake.pid_file("slurmd").write_text(f"{states['slurmctld']}\n")
    assert slurm_dev.daemon_pid(fake, "slurmd") is None
    assert slurm_dev.rest_ping_ok(slurm_cluster)
