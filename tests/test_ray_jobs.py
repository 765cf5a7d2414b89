"""`rdcd nightly` as a Ray job: a real head (`ray start --head` on 127.0.0.1 with its
dashboard), the job submitted through the Jobs API with this repository as working dir and the
history in S3, outputs checked, and the head stopped by killing only its own processes."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from nightly_data import NIGHTS, model_card, night_images, write_config
from ray.job_submission import JobStatus, JobSubmissionClient

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = pytest.mark.timeout(300)


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@dataclass
class Head:
    process: subprocess.Popen
    temp_dir: str
    dashboard: str
    token: str

    def client(self) -> JobSubmissionClient:
        return JobSubmissionClient(
            self.dashboard, headers={"Authorization": f"Bearer {self.token}"}
        )

    def stop(self) -> None:
        """Kill this head's process group, then anything else still running from its temp
        dir; never `ray stop`, which would take down every other Ray on the machine."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        for pid in _pids_mentioning(self.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def start_head(cpus: int = 2, timeout: float = 90.0) -> Head:
    """A head of its own: loopback only, free ports, its own temp dir and auth token."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are capped
    gcs, dashboard, agent, client = free_ports(4)
    token = secrets.token_hex(16)
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    command = [
        RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        f"--num-cpus={cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115 - lives as long as the head
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    head = Head(process, temp_dir, f"http://127.0.0.1:{dashboard}", token)
    deadline = time.monotonic() + timeout
    while True:
        try:
            head.client().list_jobs()
            return head
        except Exception:  # noqa: BLE001 - not up yet
            if process.poll() is not None or time.monotonic() > deadline:
                head.stop()
                raise RuntimeError(f"Ray head did not start; see {temp_dir}/head.log") from None
            time.sleep(1)


def wait_for(client: JobSubmissionClient, job_id: str, timeout: float = 240.0) -> JobStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(1)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} still {status} after {timeout}s")


@pytest.fixture(scope="module")
def head():
    head = start_head()
    yield head
    head.stop()
    assert not _pids_mentioning(head.temp_dir)


def test_nightly_job_through_the_jobs_api(head, s3_server, s3_fs, tmp_path, tmp_path_factory):
    card = model_card(tmp_path_factory.getbasetemp() / "nightly-models", "a", seed=0)
    prefix = f"{s3_server.bucket}/jobs-{uuid.uuid4().hex[:8]}"
    for name, data in night_images()[NIGHTS[0]].items():
        s3_fs.pipe(f"{prefix}/incoming/{NIGHTS[0]}/{name}", data)
    config = write_config(
        tmp_path / "nightly.yaml",
        card,
        f"s3://{prefix}/history",
        f"s3://{prefix}/incoming",
    )
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": [".git"],
        "env_vars": {
            "AWS_ENDPOINT_URL": s3_server.endpoint_url,
            "AWS_ACCESS_KEY_ID": s3_server.key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret,
            "HF_HUB_OFFLINE": "1",
        },
    }
    client = head.client()
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m pipelines.nightly --config {config} --date {NIGHTS[0]}",
        runtime_env=runtime_env,
        submission_id=f"nightly-{NIGHTS[0]}-{uuid.uuid4().hex[:6]}",
    )
    status = wait_for(client, job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "== rdcd nightly ==" in logs and "nightly-2026-11-01" in logs
    s3_fs.invalidate_cache()
    (row_file,) = s3_fs.glob(f"{prefix}/history/runs/date={NIGHTS[0]}/*.parquet")
    with s3_fs.open(row_file, "rb") as handle:
        row = pq.read_table(handle).to_pylist()[0]
    assert row["new_images"] == 9 and row["pairs"] == 1
    (pairs_file,) = s3_fs.glob(f"{prefix}/history/versions/*/pairs/date={NIGHTS[0]}/*.parquet")
    with s3_fs.open(pairs_file, "rb") as handle:
        pairs = pq.read_table(handle).to_pylist()
    assert [(p["image_id_a"], p["image_id_b"], p["exact"]) for p in pairs] == [
        ("p003.jpg", "p003_copy.jpg", True)
    ]
    assert s3_fs.exists(f"{prefix}/history/current.json")


def test_a_failing_job_says_why(head, tmp_path, tmp_path_factory):
    card = model_card(tmp_path_factory.getbasetemp() / "nightly-models", "a", seed=0)
    config = write_config(tmp_path / "bad.yaml", card, str(tmp_path / "h"), str(tmp_path / "in"))
    client = head.client()
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m pipelines.nightly --config {config} --date 2026-13-40",
        runtime_env={"working_dir": str(REPO), "excludes": [".git"]},
    )
    assert wait_for(client, job) == JobStatus.FAILED
    assert "not a calendar date" in client.get_job_logs(job)
