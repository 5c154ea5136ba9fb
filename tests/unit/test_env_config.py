"""The environment: PROBEWIRE_* for every key, OpenTelemetry's OTEL_* as the SDK spec says,
precedence flag > env > file > default, errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from probewire.config import Config, resolve_config
from probewire.errors import ConfigError
from probewire.export.otlp import signal_endpoint


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "probewire.yaml"
    path.write_text(text)
    return path


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = _file(tmp_path, "listen: 127.0.0.1:1111\nlog_level: warning\n")
    env = {"PROBEWIRE_LISTEN": "127.0.0.1:2222"}
    assert resolve_config(path, {}).listen == "127.0.0.1:1111"
    assert resolve_config(path, env).listen == "127.0.0.1:2222"
    assert resolve_config(path, env, {"listen": "127.0.0.1:3333"}).listen == "127.0.0.1:3333"
    assert resolve_config(path, env).log_level == "warning"  # the file's, env is silent
    assert resolve_config(None, {}).listen == Config().listen


def test_every_config_key_has_a_probewire_variable() -> None:
    def leaves(model: type, prefix: str) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                out += leaves(sub, f"{prefix}{name}_")
            else:
                out.append(f"{prefix}{name}")
        return out

    from probewire.config import _env_path

    for leaf in leaves(Config, ""):
        assert _env_path(Config, leaf.upper()) is not None, leaf


def test_yaml_values_and_long_field_names() -> None:
    config = resolve_config(None, {
        "PROBEWIRE_PROBES_L7_MAX_SERIES_PER_METRIC": "500",
        "PROBEWIRE_PROBES_HTTP_ROUTE_LEARNING_MAX_DISTINCT": "10",
        "PROBEWIRE_FILTER_PORTS": "[80, 443]",
        "PROBEWIRE_FILTER_K8S_NAMESPACES": "[shop]",
        "PROBEWIRE_PROBES_TCP_ENABLED": "false",
        "PROBEWIRE_SERVICES_RULES": "[{name: web, comm: nginx}]",
        "PROBEWIRE_KUBERNETES_POD_LABEL": "true",
    })
    assert config.probes.l7.max_series_per_metric == 500
    assert config.probes.http.route_learning.max_distinct == 10
    assert config.filter.ports == (80, 443)
    assert config.filter.k8s_namespaces == ("shop",)
    assert config.probes.tcp.enabled is False
    assert config.services.rules[0].name == "web"
    assert config.kubernetes.pod_label is True


def test_bad_variables_name_themselves() -> None:
    with pytest.raises(ConfigError, match="PROBEWIRE_FILTER_PORTS"):
        resolve_config(None, {"PROBEWIRE_FILTER_PORTS": "[70000]"})
    with pytest.raises(ConfigError, match="PROBEWIRE_NOPE: names no configuration key"):
        resolve_config(None, {"PROBEWIRE_NOPE": "1"})
    # Not configuration: setup.py's build switch, and Kubernetes' service links for a
    # Service named probewire.
    resolve_config(None, {"PROBEWIRE_SKIP_BPF_BUILD": "1", "PROBEWIRE_SERVICE_HOST": "10.0.0.1",
                          "PROBEWIRE_SERVICE_PORT": "9464", "PROBEWIRE_SERVICE_PORT_METRICS": "1",
                          "PROBEWIRE_PORT": "tcp://10.0.0.1:9464",
                          "PROBEWIRE_PORT_9464_TCP_ADDR": "10.0.0.1"})


def test_an_otlp_endpoint_alone_turns_export_on_with_the_spec_default_protocol() -> None:
    otlp = resolve_config(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
                          ).export.otlp
    assert otlp.enabled and otlp.protocol == "http/protobuf"
    assert signal_endpoint(otlp, "traces") == ("http/protobuf",
                                               "http://collector:4318/v1/traces")
    assert signal_endpoint(otlp, "metrics") == ("http/protobuf",
                                                "http://collector:4318/v1/metrics")
    grpc = resolve_config(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
                          ).export.otlp
    assert grpc.protocol == "grpc"
    assert signal_endpoint(grpc, "traces") == ("grpc", "http://collector:4317")


def test_per_signal_variables_are_used_as_given() -> None:
    otlp = resolve_config(None, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:9999/custom/path",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://metrics:4317",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%3Dcret,tenant=a",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "tenant=t",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
    }).export.otlp
    assert signal_endpoint(otlp, "traces") == ("http/protobuf", "http://traces:9999/custom/path")
    assert signal_endpoint(otlp, "metrics") == ("grpc", "http://metrics:4317")
    assert otlp.headers == {"api-key": "s=cret", "tenant": "a"}
    assert otlp.traces_headers == {"tenant": "t"}
    assert otlp.timeout_s == 2.5


def test_file_protocol_wins_over_the_spec_default(tmp_path: Path) -> None:
    path = _file(tmp_path, "export: {otlp: {protocol: grpc}}\n")
    otlp = resolve_config(path, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:9000"}).export.otlp
    assert otlp.protocol == "grpc" and otlp.enabled


def test_resource_attributes_and_service_name() -> None:
    otlp = resolve_config(None, {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,"
                                 "team=a%20b", "OTEL_SERVICE_NAME": "probewire-node"}).export.otlp
    assert otlp.resource_attributes == {"deployment.environment": "prod", "team": "a b",
                                        "service.name": "probewire-node"}


@pytest.mark.parametrize(
    ("sampler", "arg", "ratio", "honor"),
    [("always_on", None, 1.0, False), ("always_off", None, 0.0, False),
     ("traceidratio", "0.25", 0.25, False), ("parentbased_always_on", None, 1.0, True),
     ("parentbased_always_off", None, 0.0, True), ("parentbased_traceidratio", "0.1", 0.1, True),
     ("parentbased_traceidratio", None, 1.0, True)],
)
def test_traces_sampler_variables(sampler: str, arg: str | None, ratio: float,
                                  honor: bool) -> None:
    env = {"OTEL_TRACES_SAMPLER": sampler}
    if arg is not None:
        env["OTEL_TRACES_SAMPLER_ARG"] = arg
    config = resolve_config(None, env)
    assert config.export.otlp.sampling_ratio == ratio
    assert config.sampling.honor_traceparent is honor


def test_unsupported_sampler_and_exporters() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER"):
        resolve_config(None, {"OTEL_TRACES_SAMPLER": "jaeger_remote"})
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER_ARG"):
        resolve_config(None, {"OTEL_TRACES_SAMPLER": "traceidratio",
                              "OTEL_TRACES_SAMPLER_ARG": "half"})
    off = resolve_config(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                "OTEL_METRICS_EXPORTER": "none"}).export.otlp
    assert off.enabled and not off.metrics and off.traces
    assert not resolve_config(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                     "OTEL_SDK_DISABLED": "true"}).export.otlp.enabled


def test_empty_otel_variables_count_as_unset() -> None:
    assert not resolve_config(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}).export.otlp.enabled
