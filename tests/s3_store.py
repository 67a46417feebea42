"""A real S3 API on localhost for the tests: moto's server, in this process, stopped by its handle.

The server is moto's own WSGI application on a werkzeug server of ours, for two things moto's
ThreadedMotoServer lacks: a log of the requests it receives, and a stop and restart
on the same port that keeps the buckets (the state lives in this process), which is what a client
sees of a store that goes down and comes back. Nothing but this server is ever contacted: the
environment names its endpoint and fake credentials, and turns off the EC2 metadata lookup.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import urllib.request

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

try:
    from ports import free_port  # tests/ on the path, as under pytest
except ImportError:  # the benchmarks import this module as tests.<name>
    from tests.ports import free_port

REGION = "us-east-1"
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise


class S3Store:
    def __init__(self, bucket: str = "ensembles"):
        self.bucket, self.port = bucket, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log: list[tuple[str, str, str]] = []  # (method, path, query) of every request, in order
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server = self._thread = None

    @property
    def credentials(self) -> dict[str, str]:
        """The standard AWS environment without the endpoint: fake credentials and a region."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment that points clients (pyarrow, boto3) at this store."""
        return {**self.credentials, "AWS_ENDPOINT_URL": self.endpoint}

    def uri(self, *parts: str, query: bool = False) -> str:
        """s3://bucket/parts..., with the endpoint in the URI's own query if `query`."""
        uri = "/".join([f"s3://{self.bucket}", *parts])
        return f"{uri}?endpoint_override=127.0.0.1:{self.port}&scheme=http" if query else uri

    def _logging(self, environ, start_response):
        self.log.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("QUERY_STRING", "")))
        return self._app(environ, start_response)

    def start(self):
        self._server = make_server("127.0.0.1", self.port, self._logging, threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        """Close the port: clients get 'connection refused'; the buckets stay for a restart."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, prefix: str = "") -> dict[str, int]:
        """Object key -> size, under `prefix`, without the empty "folder/" markers pyarrow makes."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")}

    def _moto_api(self, action: str, body: str = ""):
        request = urllib.request.Request(f"{self.endpoint}/moto-api/{action}", data=body.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})  # a form body reads as empty
        json.load(urllib.request.urlopen(request, timeout=10))

    def reset(self):
        """Empty the store. moto keeps its state in this process, across servers: without this,
        a store started by one test module holds the buckets of the previous one."""
        self._moto_api("reset")

    @contextlib.contextmanager
    def authentication(self):
        """Inside: moto checks every request's credentials (none are valid: no IAM user exists)."""
        self._moto_api("reset-auth", "0")
        try:
            yield
        finally:
            self._moto_api("reset-auth", "inf")


@contextlib.contextmanager
def s3_store(bucket: str = "ensembles"):
    """A started, empty store with `bucket` created; stopped on exit."""
    store = S3Store(bucket)
    store.start()
    try:
        store.reset()
        store.client().create_bucket(Bucket=bucket)
        yield store
    finally:
        with contextlib.suppress(Exception):
            store.stop()
