"""Session-wide real components: a local Ray on loopback and a SeaweedFS S3 server."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "0")

import pytest  # noqa: E402
from s3server import S3Server, start_s3_server  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3 endpoint on 127.0.0.1; AWS_* variables point every client at it."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url
    os.environ["AWS_ACCESS_KEY_ID"] = server.key
    os.environ["AWS_SECRET_ACCESS_KEY"] = server.secret
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_fs(s3_server):
    """An s3fs filesystem against the test server."""
    import s3fs

    return s3fs.S3FileSystem(
        key=s3_server.key,
        secret=s3_server.secret,
        client_kwargs={"endpoint_url": s3_server.endpoint_url},
    )


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A local Ray for the whole session, started after the S3 variables are set so that
    its workers inherit them."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
        )
    yield ray
    ray.shutdown()
