"""Static checks of the TLS deployment files: the compose override and the Kubernetes TLS
overlay mount what they say, name real settings, and match what ``pdserve certs`` writes and
what the cluster-auth check expects (``spiffe://<cluster>/<role>``)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pdserve.tls import SERVICE_ROLES, ClusterPki, spiffe_id
from tests.observability.test_deploy import (
    COMPOSE,
    DEPLOY,
    _check_jsonschema,
    env_names,
    pdserve_services,
    settings_class,
)

OVERRIDE = DEPLOY / "docker-compose.tls.yml"
OVERLAY = DEPLOY / "k8s" / "tls"
TLS_ENV = {"PDSERVE_TLS_CERT_FILE", "PDSERVE_TLS_KEY_FILE", "PDSERVE_TLS_CA_FILE"}


def test_compose_override_validates_and_mounts_what_pdserve_certs_writes():
    assert _check_jsonschema(OVERRIDE).returncode == 0
    override = yaml.safe_load(OVERRIDE.read_text())
    base = pdserve_services(yaml.safe_load(COMPOSE.read_text()))
    pki = ClusterPki(Path("secrets"))
    declared = {name: Path(s["file"]) for name, s in override["secrets"].items()}
    assert declared["ca"] == pki.ca_file
    assert set(override["services"]) == {name for name in base}
    for name, service in override["services"].items():
        module, _ = base[name]
        known = env_names(settings_class(module))
        env = service["environment"]
        assert all(k.upper() in known for k in env), (name, env)
        assert set(env) >= TLS_ENV
        mounted = {f"/run/secrets/{s}": declared[s] for s in service["secrets"]}
        assert mounted[env["PDSERVE_TLS_CA_FILE"]] == pki.ca_file
        assert mounted[env["PDSERVE_TLS_CERT_FILE"]] == pki.cert_file(name)
        assert mounted[env["PDSERVE_TLS_KEY_FILE"]] == pki.key_file(name)
    assert "PDSERVE_ROUTER_API_KEYS_FILE" in override["services"]["router"]["environment"]


def _overlay() -> tuple[dict, list[dict], dict[str, dict]]:
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    certificates = list(yaml.safe_load_all((OVERLAY / "certificates.yaml").read_text()))
    patches = {
        p["path"]: yaml.safe_load((OVERLAY / p["path"]).read_text())
        for p in kustomization["patches"]
    }
    return kustomization, certificates, patches


def test_kubernetes_overlay_gives_each_service_its_certificate_and_an_mtls_probe():
    kustomization, certificates, patches = _overlay()
    assert (OVERLAY / kustomization["resources"][0] / "kustomization.yaml").is_file()
    config = yaml.safe_load((DEPLOY / "k8s" / "config.yaml").read_text())
    cluster = config["data"]["PDSERVE_CLUSTER_NAME"]
    issued = {
        c["spec"]["secretName"]: c["spec"] for c in certificates if c["kind"] == "Certificate"
    }
    roles = set()
    for patch in patches.values():
        role = patch["metadata"]["name"]
        roles.add(role)
        pod = patch["spec"]["template"]["spec"]
        [container] = pod["containers"]
        module = f"services.{role}"
        cls = settings_class(module)
        env = {e["name"]: e["value"] for e in container["env"]}
        assert all(k.upper() in env_names(cls) for k in env), (role, env)
        assert set(env) >= TLS_ENV
        volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        secret = mounts["/etc/pdserve/tls"]
        spec = issued[secret]
        assert spec["uris"] == [spiffe_id(cluster, role)]
        assert env["PDSERVE_TLS_SERVER_NAME"] in spec["dnsNames"]
        assert "127.0.0.1" in spec["ipAddresses"]  # the exec probe dials the pod itself
        for key in TLS_ENV:
            assert env[key].startswith("/etc/pdserve/tls/")
        probe = container["readinessProbe"]
        assert probe["grpc"] is None  # kubelet's gRPC probe cannot present a certificate
        port = cls.model_fields["grpc_port"].default
        assert probe["exec"]["command"] == [
            "python", "-m", "pdserve.healthcheck", f"127.0.0.1:{port}"
        ]  # fmt: skip
    assert roles == set(SERVICE_ROLES)
