"""Redis TLS files and credentials reach every service's Redis clients.

The bundled redis-server has no TLS, so these check the clients' connection settings (the
handshake itself is redis-py's); the password path runs against a real server in
tests/kvstore/test_metadata.py."""

from __future__ import annotations

import pytest
import redis

from pdserve.kv.metadata import connect_for
from services.decode.settings import DecodeSettings
from services.kvstore.node import KVStoreNode
from services.prefill.settings import PrefillSettings
from services.router.server import RouterServer
from services.router.settings import RouterSettings
from tests.kvstore.helpers import settings as kvstore_settings

URL = "rediss://:pw@127.0.0.1:6380/0"  # never dialed: clients connect lazily


def tls_kwargs(client: redis.Redis) -> tuple:
    kw = client.connection_pool.connection_kwargs
    return (client.connection_pool.connection_class, kw.get("password"),
            kw.get("ssl_ca_certs"), kw.get("ssl_certfile"), kw.get("ssl_keyfile"))  # fmt: skip


@pytest.fixture
def files(tmp_path):
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for p in paths.values():
        p.write_text("unused: never dialed")
    return paths


def expected(files) -> tuple:
    return (redis.SSLConnection, "pw", str(files["ca"]), str(files["cert"]), str(files["key"]))


def redis_fields(files) -> dict:
    return dict(redis_url=URL, redis_ca_file=files["ca"], redis_cert_file=files["cert"],
                redis_key_file=files["key"])  # fmt: skip


def test_the_router_honours_the_redis_ca_file(files):
    """Regression: the router dialed rediss:// without the CA file (private CAs broke it)."""
    server = RouterServer(RouterSettings(
        redis_url=URL, redis_ca_file=files["ca"], grpc_port=0, http_port=0,
    ))  # fmt: skip
    for client in (server.directory.registry._redis, server.directory.index._redis):
        kw = client.connection_pool.connection_kwargs
        assert kw["ssl_ca_certs"] == str(files["ca"]) and kw["password"] == "pw"


def test_every_service_gives_its_redis_client_the_tls_files_and_credentials(files, tmp_path):
    fields = redis_fields(files)
    for cls in (RouterSettings, PrefillSettings, DecodeSettings):
        assert tls_kwargs(connect_for(cls(**fields))) == expected(files), cls.__name__
    node = KVStoreNode(kvstore_settings(tmp_path, **fields))
    try:
        assert tls_kwargs(node.redis) == expected(files)
    finally:
        node.store.close()


def test_a_client_certificate_needs_its_key(files):
    with pytest.raises(ValueError, match="go together"):
        RouterSettings(redis_url=URL, redis_cert_file=files["cert"])
