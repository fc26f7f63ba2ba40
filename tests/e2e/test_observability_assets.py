"""Checks for the observability example in examples/observability/.

The Prometheus rules, the Prometheus config, the Collector config and the
docker-compose file are validated statically and against each other, and the
alerting rules are unit-tested with ``promtool test rules``. promtool is a
hard requirement: without it these tests fail, they are never skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OBS = REPO / "examples" / "observability"

COLLECTOR_CONFIG = "otel-collector.yaml"
PROMETHEUS_CONFIG = "prometheus.yml"
ALERTS = "alerts.yml"
ALERTS_TEST = "alerts_test.yml"

# --------------------------------------------------------------------------------------------------------
# The metric contract: the Prometheus names (and labels) of the metrics the library emits, as produced by
# the OpenTelemetry Prometheus exporter and by the Collector's prometheus exporter. alerts.yml may only use
# these. Scraped series also carry job and instance.
# --------------------------------------------------------------------------------------------------------
_SERVER = frozenset({"server_address", "server_port"})
_DURATION_LABELS = frozenset(
    {"db_system_name", "db_operation_name", "server_address", "server_port", "error_type"}
)
METRIC_LABELS: dict[str, frozenset[str]] = {
    "redis_resilience_breaker_state": frozenset({"state"}) | _SERVER,
    "redis_resilience_breaker_transitions_total": frozenset({"state", "previous_state"}) | _SERVER,
    "redis_resilience_retries_total": frozenset({"db_operation_name", "error_type"}) | _SERVER,
    "redis_resilience_rejections_total": frozenset({"reason"}) | _SERVER,
    "redis_resilience_fallbacks_total": frozenset({"reason", "kind"}),
    "db_client_operation_duration_seconds_bucket": _DURATION_LABELS | {"le"},
    "db_client_operation_duration_seconds_sum": _DURATION_LABELS,
    "db_client_operation_duration_seconds_count": _DURATION_LABELS,
    "redis_resilience_writebehind_queue_size": frozenset(),
    "redis_resilience_writebehind_rejected_total": frozenset(),
}
SCRAPE_LABELS = frozenset({"job", "instance"})
_BREAKER_STATES = frozenset({"closed", "open", "half_open"})
LABEL_VALUES: dict[str, frozenset[str]] = {
    "state": _BREAKER_STATES,
    "previous_state": _BREAKER_STATES,
    "reason": frozenset({"breaker_open", "budget_exhausted", "deadline_exceeded"}),
    "kind": frozenset({"value", "function", "last_known_good", "miss"}),
}

REQUIRED_ALERTS = {
    "RedisBreakerOpen": "critical",
    "RedisHighFallbackRate": "warning",
    "RedisRetryBudgetExhausted": "warning",
}


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
def _load(name: str) -> Any:
    path = OBS / name
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _promtool() -> str:
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not path:
        pytest.fail(
            "promtool is not installed (not on PATH and $PROMTOOL unset). It is required to validate "
            "examples/observability: install it (Debian/Ubuntu: `apt-get install prometheus`) or point "
            "$PROMTOOL at the binary. This check is never skipped.",
            pytrace=False,
        )
    return path


def _run_promtool(*args: str) -> str:
    cmd = [_promtool(), *args]
    proc = subprocess.run(cmd, cwd=OBS, capture_output=True, text=True, timeout=120, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"`{shlex.join(cmd)}` exited {proc.returncode} in {OBS}:\n{output}"
    return output


def _alert_rules() -> list[dict[str, Any]]:
    rules = []
    for group in _load(ALERTS)["groups"]:
        rules.extend(rule for rule in group["rules"] if "alert" in rule)
    return rules


def _services() -> dict[str, dict[str, Any]]:
    services = _load("docker-compose.yml")["services"]
    assert isinstance(services, dict)
    assert services
    return services


def _host_port(address: str) -> tuple[str, int]:
    """Host and port of ``host:port`` or ``scheme://host:port[/path]``."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    assert parts.hostname, f"no host in {address!r}"
    assert parts.port, f"no port in {address!r}"
    return parts.hostname, parts.port


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(local source, container target) of a service's bind mounts of local paths."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        else:
            if volume.get("type") != "bind":
                continue
            source, target = volume["source"], volume["target"]
        if source.startswith((".", "/", "~")):  # anything else is a named volume
            mounts.append((source, target))
    return mounts


def _mount_target(service: dict[str, Any], local_name: str) -> str:
    local = (OBS / local_name).resolve()
    targets = [target for source, target in _bind_mounts(service) if (OBS / source).resolve() == local]
    assert len(targets) == 1, f"expected one mount of {local_name}, got {targets}"
    return targets[0]


def _service_mounting(local_name: str) -> str:
    local = (OBS / local_name).resolve()
    names = [
        name
        for name, service in _services().items()
        if any((OBS / source).resolve() == local for source, _ in _bind_mounts(service))
    ]
    assert len(names) == 1, f"expected exactly one compose service mounting {local_name}, got {names}"
    return names[0]


def _dockerfile(service: dict[str, Any]) -> Path:
    build = service["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = (OBS / build["context"]).resolve()
    return context / build.get("dockerfile", "Dockerfile")


def _container_ports(service: dict[str, Any]) -> set[int]:
    """Container ports a compose service declares (ports, expose, and EXPOSE of a built Dockerfile)."""
    ports: set[int] = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    ports.update(int(str(entry).split("/")[0]) for entry in service.get("expose", []))
    if "build" in service and _dockerfile(service).is_file():
        for match in re.finditer(r"^EXPOSE\s+(.+)$", _dockerfile(service).read_text(), re.MULTILINE):
            ports.update(int(port.split("/")[0]) for port in match.group(1).split())
    return ports


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _scrape_targets() -> list[tuple[str, str, int]]:
    """(job, host, port) of every static target in prometheus.yml."""
    targets = []
    for job in _load(PROMETHEUS_CONFIG)["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                targets.append((job["job_name"], *_host_port(target)))
    return targets


def _component_type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def _collector_exporters(pipeline: str, component_type: str) -> list[dict[str, Any]]:
    config = _load(COLLECTOR_CONFIG)
    ids = config["service"]["pipelines"][pipeline]["exporters"]
    return [config["exporters"][i] or {} for i in ids if _component_type(i) == component_type]


# A deliberately small PromQL scanner: good enough to find the metric names, label matchers and grouping
# labels in the rules of alerts.yml, which only use plain selectors.
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{((?:[^}\"]|\"(?:[^\"\\]|\\.)*\")*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"")
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "group_left", "group_right"}
)


def _scan_promql(expr: str) -> tuple[set[str], list[tuple[str | None, str, str, str]], set[str]]:
    """Metric names, label matchers (metric, label, op, value) and grouping labels of a PromQL expression."""
    grouping = {label.strip() for labels in _GROUPING.findall(expr) for label in labels.split(",")}
    grouping.discard("")
    rest = _GROUPING.sub(" ", expr)
    metrics: set[str] = set()
    matchers: list[tuple[str | None, str, str, str]] = []
    for selector in _SELECTOR.finditer(rest):
        name = selector.group(1) if selector.group(1) not in _KEYWORDS else None
        if name:
            metrics.add(name)
        matchers.extend((name, *m) for m in _MATCHER.findall(selector.group(2)))
    rest = _SELECTOR.sub(" ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", _STRING.sub(" ", rest))
    metrics.update(name for name in _IDENT.findall(rest) if name not in _KEYWORDS)
    return metrics, matchers, grouping


# --------------------------------------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------------------------------------
def test_promtool_check_rules() -> None:
    output = _run_promtool("check", "rules", ALERTS)
    assert "SUCCESS" in output, output


def test_promtool_test_rules() -> None:
    output = _run_promtool("test", "rules", ALERTS_TEST)
    assert "SUCCESS" in output, output


def test_promtool_check_config() -> None:
    # Also loads and checks the rule files that prometheus.yml references.
    output = _run_promtool("check", "config", PROMETHEUS_CONFIG)
    assert "SUCCESS" in output, output


# --------------------------------------------------------------------------------------------------------
# alerts.yml and alerts_test.yml
# --------------------------------------------------------------------------------------------------------
def test_alert_group_has_the_required_alerts() -> None:
    groups = _load(ALERTS)["groups"]
    assert [group["name"] for group in groups] == ["redis-resilience"]
    rules = {rule["alert"]: rule for rule in _alert_rules()}
    assert len(rules) == len(_alert_rules()), "duplicate alert names"
    for name, severity in REQUIRED_ALERTS.items():
        assert name in rules, f"{name} missing from {ALERTS}"
        assert rules[name]["labels"]["severity"] == severity
    assert rules["RedisBreakerOpen"]["for"] == "1m"
    assert rules["RedisHighFallbackRate"]["for"] == "5m"
    assert rules["RedisRetryBudgetExhausted"].get("for", "0m") in {"0m", "0s", "1m"}
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        for annotation in ("summary", "description"):
            assert rule["annotations"].get(annotation, "").strip(), f"{name} has no {annotation}"


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    suite = _load(ALERTS_TEST)
    assert suite["rule_files"] == [ALERTS]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in suite["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert alerts - firing == set(), "alerts without a test case where they fire"
    assert alerts - silent == set(), "alerts without a test case where they must not fire"
    assert (firing | silent) - alerts == set(), "tests for alerts that do not exist"


def test_promql_scanner_finds_names_matchers_and_grouping() -> None:
    metrics, matchers, grouping = _scan_promql(
        'sum by (job, server_port) (rate(redis_resilence_retries_total{error_type="Timeout"}[5m]))'
        " / on (job) group_left up > 0 and bool absent(foo_total) unless x offset 5m"
    )
    assert metrics == {"redis_resilence_retries_total", "up", "foo_total", "x"}
    assert matchers == [("redis_resilence_retries_total", "error_type", "=", "Timeout")]
    assert grouping == {"job", "server_port"}


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: rule["alert"])
def test_alerts_only_use_contract_metrics_and_labels(rule: dict[str, Any]) -> None:
    metrics, matchers, grouping = _scan_promql(rule["expr"])
    assert metrics, f"no metric found in {rule['expr']!r}"
    unknown = metrics - METRIC_LABELS.keys()
    assert not unknown, f"metrics not in the library's contract: {sorted(unknown)}"
    known_labels = SCRAPE_LABELS.union(*(METRIC_LABELS[m] for m in metrics))
    assert grouping <= known_labels, f"grouping by unknown labels {sorted(grouping - known_labels)}"
    for metric, label, op, value in matchers:
        assert metric is not None, "selectors must name their metric"
        assert label in METRIC_LABELS[metric] | SCRAPE_LABELS, f"{metric} has no label {label!r}"
        if op in {"=", "!="} and label in LABEL_VALUES:
            assert value in LABEL_VALUES[label], f"{label}={value!r} is never emitted"


# --------------------------------------------------------------------------------------------------------
# otel-collector.yaml
# --------------------------------------------------------------------------------------------------------
def test_collector_pipelines_reference_defined_components() -> None:
    config = _load(COLLECTOR_CONFIG)
    pipelines = config["service"]["pipelines"]
    assert {"traces", "metrics"} <= pipelines.keys()
    connectors = set(config.get("connectors") or {})
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            defined = set(config.get(kind) or {})
            if kind != "processors":
                defined |= connectors
            missing = set(pipeline.get(kind, [])) - defined
            assert not missing, f"pipeline {name}: {kind} {sorted(missing)} not defined"
        assert pipeline["receivers"], name
        assert pipeline["exporters"], name
        assert "batch" in pipeline.get("processors", []), name


def test_collector_otlp_receiver_listens_on_all_interfaces() -> None:
    protocols = _load(COLLECTOR_CONFIG)["receivers"]["otlp"]["protocols"]
    assert _host_port(protocols["grpc"]["endpoint"]) == ("0.0.0.0", 4317)
    assert _host_port(protocols["http"]["endpoint"]) == ("0.0.0.0", 4318)
    for pipeline in _load(COLLECTOR_CONFIG)["service"]["pipelines"].values():
        assert "otlp" in pipeline["receivers"]


def test_collector_traces_go_to_a_compose_service_over_otlp() -> None:
    exporters = _collector_exporters("traces", "otlp")
    assert exporters, "the traces pipeline has no otlp exporter"
    services = _services()
    for exporter in exporters:
        host, port = _host_port(exporter["endpoint"])
        assert host in services, f"otlp exporter endpoint host {host!r} is not a compose service"
        assert port in _container_ports(services[host]), f"{host} does not declare port {port}"
        assert exporter.get("tls", {}).get("insecure") is True, "the demo's Jaeger has no TLS"
    assert _host_port(exporters[0]["endpoint"]) == ("jaeger", 4317)


def test_collector_prometheus_exporter_is_scraped() -> None:
    exporters = _collector_exporters("metrics", "prometheus")
    assert len(exporters) == 1, "the metrics pipeline needs exactly one prometheus exporter"
    exporter = exporters[0]
    assert exporter["resource_to_telemetry_conversion"]["enabled"] is True
    bind_host, port = _host_port(exporter["endpoint"])
    assert bind_host == "0.0.0.0", "Prometheus scrapes from another container"
    collector = _service_mounting(COLLECTOR_CONFIG)
    scraped = {(host, target_port) for _, host, target_port in _scrape_targets()}
    assert (collector, port) in scraped, f"prometheus.yml does not scrape {collector}:{port}"
    assert port in _container_ports(_services()[collector])


# --------------------------------------------------------------------------------------------------------
# docker-compose.yml and prometheus.yml
# --------------------------------------------------------------------------------------------------------
def test_compose_has_the_example_services() -> None:
    services = _services()
    assert {"jaeger", "otel-collector", "prometheus", "redis", "app"} <= services.keys()
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", services["jaeger"]["image"])
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["redis"]["image"] == "redis:7"
    for name, service in services.items():
        if "image" in service:
            assert ":" in service["image"], f"{name}: pin the image tag"
            assert not service["image"].endswith(":latest"), f"{name}: pin the image tag"
        depends_on = service.get("depends_on", [])
        assert set(depends_on) <= services.keys(), f"{name} depends on unknown services"


def test_compose_mounted_files_exist() -> None:
    mounted = 0
    for name, service in _services().items():
        for source, target in _bind_mounts(service):
            path = (OBS / source).resolve()
            assert path.exists(), f"{name} mounts {source}, which does not exist"
            assert path.is_relative_to(REPO), f"{name} mounts {source}, outside the repository"
            assert PurePosixPath(target).is_absolute(), f"{name}: mount target {target} must be absolute"
            mounted += 1
    assert mounted >= 3


def test_compose_collector_runs_the_mounted_config() -> None:
    service = _services()[_service_mounting(COLLECTOR_CONFIG)]
    assert service["image"].startswith("otel/opentelemetry-collector-contrib:")
    target = _mount_target(service, COLLECTOR_CONFIG)
    command = service.get("command", [])
    if isinstance(command, str):
        command = shlex.split(command)
    configs = [arg.split("=", 1)[1] for arg in command if arg.startswith("--config=")]
    # Without --config the contrib image reads /etc/otelcol-contrib/config.yaml.
    assert (configs or ["/etc/otelcol-contrib/config.yaml"]) == [target]


def test_compose_prometheus_mounts_config_and_rule_files() -> None:
    name = _service_mounting(PROMETHEUS_CONFIG)
    service = _services()[name]
    assert service["image"].startswith("prom/prometheus:")
    assert 9090 in _container_ports(service)
    config_target = PurePosixPath(_mount_target(service, PROMETHEUS_CONFIG))
    command = service.get("command") or []
    configs = [arg.split("=", 1)[1] for arg in command if arg.startswith("--config.file=")]
    # Without --config.file the image reads /etc/prometheus/prometheus.yml.
    assert (configs or ["/etc/prometheus/prometheus.yml"]) == [str(config_target)]
    rule_files = _load(PROMETHEUS_CONFIG)["rule_files"]
    assert rule_files == [ALERTS]
    for rule_file in rule_files:
        assert (OBS / rule_file).is_file()
        # rule_files are resolved relative to the config file inside the container.
        assert _mount_target(service, rule_file) == str(config_target.parent / rule_file)


def test_prometheus_scrapes_compose_services() -> None:
    services = _services()
    config = _load(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "15s"
    assert config["global"]["evaluation_interval"] == "15s"
    scraped = set()
    for job, host, port in _scrape_targets():
        if host == "localhost":  # Prometheus scraping itself
            continue
        assert host in services, f"job {job}: target host {host!r} is not a compose service"
        assert port in _container_ports(services[host]), f"job {job}: {host} does not declare port {port}"
        scraped.add((host, port))
    assert ("app", 8000) in scraped
    assert (_service_mounting(COLLECTOR_CONFIG), 8889) in scraped
    app_jobs = [job for job in config["scrape_configs"] if "app:8000" in job["static_configs"][0]["targets"]]
    assert app_jobs[0].get("metrics_path", "/metrics") == "/metrics"


def test_app_exports_otlp_to_the_collector() -> None:
    env = _environment(_services()["app"])
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    receiver = "grpc" if protocol == "grpc" else "http"
    assert endpoint.scheme == "http"
    assert endpoint.hostname == _service_mounting(COLLECTOR_CONFIG)
    protocols = _load(COLLECTOR_CONFIG)["receivers"]["otlp"]["protocols"]
    assert receiver in protocols, f"the collector has no OTLP {receiver} receiver for {protocol}"
    assert endpoint.port == _host_port(protocols[receiver]["endpoint"])[1]
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert _host_port(env["REDIS_URL"])[0] in _services()


def test_app_image_runs_the_example_app() -> None:
    service = _services()["app"]
    dockerfile = _dockerfile(service)
    assert (OBS / service["build"]["context"]).resolve() == REPO
    assert dockerfile == OBS / "Dockerfile"
    assert dockerfile.is_file(), f"{dockerfile} is missing"
    text = dockerfile.read_text()
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert cmd, "the Dockerfile needs an exec-form CMD"
    argv = yaml.safe_load(cmd.group(1))
    assert argv[:2] == ["uvicorn", "examples.starlette_app:app"]
    assert argv[argv.index("--port") + 1] == "8000"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert re.search(r"pip install[^\n]*/src", text), "the Dockerfile must pip-install the repository"
