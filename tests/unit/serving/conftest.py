"""Fixtures shared by the serving tests."""

from __future__ import annotations

import boto3
import pytest

from fixtures_serving import free_port

S3_BUCKETS = ("bundles", "models")


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch):
    """A moto S3 server on a free local port with buckets ``bundles`` and ``models`` and dummy credentials."""
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for bucket in S3_BUCKETS:
            s3.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
