"""Security alerts as OTLP log records, through the OpenTelemetry SDK's log exporter, to the
collector export.otlp points at (same endpoint, protocol, headers and TLS as metrics and spans).

One log record per alert: the body is a one-line summary, severity follows the rule's
(critical -> FATAL, high -> ERROR, medium -> WARN, low -> INFO2, info -> INFO), the event name is
``probewire.security.alert`` and the attributes carry the alert flattened with OpenTelemetry's
process.* names where one exists (argv already redacted). The SDK's batch processor does the
queueing and the retries; the ring reader only hands the record over.
"""

from __future__ import annotations

import json
import time
from typing import Any

from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter

from probewire import __version__
from probewire.config import OtlpConfig
from probewire.export.otlp import _read, agent_resource

__all__ = ["OtlpAlertLogs", "alert_attributes", "make_log_exporter"]

SEVERITY = {"critical": SeverityNumber.FATAL, "high": SeverityNumber.ERROR,
            "medium": SeverityNumber.WARN, "low": SeverityNumber.INFO2,
            "info": SeverityNumber.INFO}
EVENT_NAME = "probewire.security.alert"


def make_log_exporter(cfg: OtlpConfig) -> LogRecordExporter:
    headers = dict(cfg.headers)
    if cfg.protocol == "grpc":
        import grpc  # type: ignore[import-untyped]
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        endpoint = cfg.endpoint or "http://localhost:4317"
        insecure = cfg.insecure and not endpoint.startswith("https://")
        credentials = None
        if not insecure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(cfg.certificate_file, "certificate_file"),
                private_key=_read(cfg.client_key_file, "client_key_file"),
                certificate_chain=_read(cfg.client_certificate_file, "client_certificate_file"),
            )
        return OTLPLogExporter(endpoint=endpoint, insecure=insecure, credentials=credentials,
                               headers=headers, timeout=cfg.timeout_s)
    from opentelemetry.exporter.otlp.proto.http._log_exporter import (
        OTLPLogExporter as HttpLogs,
    )

    base = (cfg.endpoint or "http://localhost:4318").rstrip("/")
    return HttpLogs(endpoint=f"{base}/v1/logs", headers=headers, timeout=cfg.timeout_s,
                    certificate_file=cfg.certificate_file,
                    client_certificate_file=cfg.client_certificate_file,
                    client_key_file=cfg.client_key_file)


def alert_attributes(alert: dict[str, Any]) -> dict[str, Any]:
    proc = alert["process"]
    attrs: dict[str, Any] = {
        "probewire.security.rule": alert["rule"],
        "probewire.security.severity": alert["severity"],
        "probewire.security.action": alert["action"],
        "probewire.security.alert_id": alert["id"],
        "service.name": alert["service_name"],
        "process.pid": proc["pid"],
        "process.executable.path": proc["exe"] or proc["filename"],
        "process.command_args": list(proc["argv"]),
        "process.user.id": proc["euid"],
        "process.user.name": proc["user"],
        "process.parent_pid": alert["ancestry"][0]["pid"] if alert["ancestry"] else 0,
        "probewire.security.ancestry": json.dumps(alert["ancestry"], separators=(",", ":")),
        "probewire.security.evidence": json.dumps(alert["evidence"], separators=(",", ":")),
    }
    if alert.get("container_id"):
        attrs["container.id"] = alert["container_id"]
    return attrs


class OtlpAlertLogs:
    """An alert sink (security/alerts.py) that exports OTLP log records."""

    name = "otlp"

    def __init__(self, cfg: OtlpConfig, exporter: LogRecordExporter | None = None) -> None:
        self.dropped = 0
        self.provider = LoggerProvider(resource=agent_resource(cfg.resource_attributes),
                                       shutdown_on_exit=False)
        self.provider.add_log_record_processor(BatchLogRecordProcessor(
            exporter or make_log_exporter(cfg), schedule_delay_millis=200,
            export_timeout_millis=cfg.timeout_s * 1000))
        self.logger = self.provider.get_logger("probewire.security", __version__)

    def emit(self, alert: dict[str, Any]) -> None:
        proc = alert["process"]
        body = (f"{alert['rule']} ({alert['severity']}): pid {proc['pid']} "
                f"{proc['exe'] or proc['filename']} {' '.join(proc['argv'])} "
                f"[service {alert['service_name']}]")
        self.logger.emit(
            timestamp=int(alert["time"] * 1e9), observed_timestamp=time.time_ns(),
            severity_number=SEVERITY[alert["severity"]], severity_text=alert["severity"].upper(),
            body=body, attributes=alert_attributes(alert), event_name=EVENT_NAME,
        )

    def flush(self) -> None:
        self.provider.force_flush()

    def close(self) -> None:
        self.provider.shutdown()
