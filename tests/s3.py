"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1, a free port.

    from tests.s3 import s3  # noqa: F401  (the fixture)

    def test_x(s3):            # s3.endpoint, s3.env (for subprocesses), s3.client (boto3)
        s3.client.create_bucket(Bucket="b")

The fixture sets S3_ENDPOINT_URL (read by Composer's S3ObjectStore) and test credentials in this
process's environment for the test's duration; `s3.env` is a copy for subprocesses. Every test
gets empty buckets: moto's state is reset after each test.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint: str
    client: object  # boto3 S3 client

    @property
    def env(self) -> dict:
        return {**CREDENTIALS, "S3_ENDPOINT_URL": self.endpoint}

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


_SERVER: list = []


def _moto_endpoint() -> str:
    """One server per test process, started on first use (a daemon thread: it ends with the process)."""
    if not _SERVER:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        _SERVER.append(server)
    host, port = _SERVER[0].get_host_and_port()
    return f"http://{host}:{port}"


@pytest.fixture
def s3(monkeypatch):
    import boto3
    import requests

    _moto_server = _moto_endpoint()
    for k, v in {**CREDENTIALS, "S3_ENDPOINT_URL": _moto_server}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    client = boto3.client("s3", endpoint_url=_moto_server, **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"})
    yield S3Server(_moto_server, client)
    requests.post(f"{_moto_server}/moto-api/reset", timeout=10)
