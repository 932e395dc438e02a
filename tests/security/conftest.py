"""Certificates for the security tests: a cluster CA (whose key the tests keep) with service
certificates, a certificate the same CA issued to something that is not a service, one for
a service of another cluster, and a stranger's CA."""

from __future__ import annotations

import pytest

from pdserve.tls import ClusterSecurity, Pem, issue_certificate, make_ca

CLUSTER = "sec"


@pytest.fixture(scope="session")
def identities(tmp_path_factory) -> dict[str, ClusterSecurity]:
    """name -> a ClusterSecurity that presents that certificate and trusts the cluster CA."""
    d = tmp_path_factory.mktemp("identities")
    ca, stranger_ca = make_ca(CLUSTER), make_ca("elsewhere")
    (d / "ca.pem").write_bytes(ca.cert)
    hosts = ["127.0.0.1"]
    pems: dict[str, Pem] = {
        role: issue_certificate(ca, CLUSTER, role, hosts=hosts)
        for role in ("kvstore", "prefill", "decode", "operator")
    }
    pems["other-cluster"] = issue_certificate(ca, "other", "decode", hosts=hosts)
    pems["foreign"] = issue_certificate(stranger_ca, CLUSTER, "decode", hosts=hosts)
    out = {}
    for name, pem in pems.items():
        (d / f"{name}.pem").write_bytes(pem.cert)
        (d / f"{name}-key.pem").write_bytes(pem.key)
        out[name] = ClusterSecurity(
            cluster_name=CLUSTER, cert_file=d / f"{name}.pem", key_file=d / f"{name}-key.pem",
            ca_file=d / "ca.pem",
        )  # fmt: skip
    return out
