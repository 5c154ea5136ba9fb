"""Config loading: defaults, the documented example, and errors that name file, field and fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from probewire.config import Config, ServiceRule, config_from_mapping, load_config, parse_listen
from probewire.errors import EXIT_USAGE, ConfigError

EXAMPLE = """\
listen: "127.0.0.1:9464"
log_level: info
probes:
  tcp:     {enabled: true}
  process: {enabled: false}
ring:
  size_bytes: 1048576
  batch_records: 64
  flush_ms: 2.5
filter:
  pids: [1, 42]
  cgroups: [/sys/fs/cgroup/system.slice/nginx.service, 1234]
  ports: [80, 443]
services:
  rules:
    - name: payments
      exe: "/usr/bin/java"
      comm: "java"
      cmdline: "payments.*jar"
      cgroup: "payments"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "probewire.yaml"
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message, "every config error names the file"
    assert caught.value.exit_code == EXIT_USAGE
    return message


def test_no_file_gives_the_documented_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.listen == "127.0.0.1:9464"
    assert config.listen_address == ("127.0.0.1", 9464)
    assert config.log_level == "info"
    assert config.probes.tcp.enabled and config.probes.process.enabled
    assert config.ring.size_bytes == 4194304
    assert config.ring.batch_records == 128
    assert config.ring.flush_ms == 5.0
    assert config.filter.pids == () and config.filter.cgroups == () and config.filter.ports == ()
    assert config.services.rules == ()


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text)) == Config()


def test_documented_example_loads_every_field(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, EXAMPLE))
    assert config.probes.process.enabled is False
    assert config.ring.size_bytes == 1048576
    assert config.ring.batch_records == 64
    assert config.ring.flush_ms == 2.5
    assert config.filter.pids == (1, 42)
    assert config.filter.cgroups == ("/sys/fs/cgroup/system.slice/nginx.service", 1234)
    assert config.filter.ports == (80, 443)
    assert config.services.rules == (
        ServiceRule(
            name="payments",
            exe="/usr/bin/java",
            comm="java",
            cmdline="payments.*jar",
            cgroup="payments",
        ),
    )


def test_config_is_immutable() -> None:
    config = Config()
    with pytest.raises(ValidationError):
        config.listen = "0.0.0.0:1"


def test_unknown_key_names_dotted_path_and_known_fields(tmp_path: Path) -> None:
    message = load_error(tmp_path, "probes:\n  tcpp: {enabled: true}\n")
    assert "probes.tcpp" in message
    assert "remove it; known fields are: tcp, l7, http, process" in message


def test_unknown_key_inside_a_rule_lists_rule_fields(tmp_path: Path) -> None:
    message = load_error(tmp_path, "services:\n  rules:\n    - {name: a, comm: a, exec: b}\n")
    assert "services.rules.0.exec" in message
    assert "known fields are: name, exe, comm, cmdline, cgroup" in message


def test_unknown_top_level_key_is_an_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, "lsten: 1.2.3.4:5\n")
    assert "lsten: unknown field" in message
    assert "listen" in message and "services" in message


@pytest.mark.parametrize("size_bytes", [0, 2048, 5000, 4096 * 3, -4096])
def test_ring_size_must_be_power_of_two_of_at_least_a_page(tmp_path: Path, size_bytes: int) -> None:
    message = load_error(tmp_path, f"ring: {{size_bytes: {size_bytes}}}\n")
    assert "ring.size_bytes" in message
    assert "power of two" in message


@pytest.mark.parametrize("size_bytes", [4096, 65536, 1 << 30])
def test_ring_size_accepts_powers_of_two(size_bytes: int) -> None:
    assert config_from_mapping({"ring": {"size_bytes": size_bytes}}).ring.size_bytes == size_bytes


@pytest.mark.parametrize(
    ("ring", "field"),
    [
        ("{flush_ms: 0}", "ring.flush_ms"),
        ("{flush_ms: -1.5}", "ring.flush_ms"),
        ("{flush_ms: .nan}", "ring.flush_ms"),
        ("{batch_records: 0}", "ring.batch_records"),
        ("{batch_records: 1.5}", "ring.batch_records"),
        ("{size_bytes: '4096'}", "ring.size_bytes"),
    ],
)
def test_bad_ring_numbers_name_the_field_and_the_expected_value(
    tmp_path: Path, ring: str, field: str
) -> None:
    message = load_error(tmp_path, f"ring: {ring}\n")
    assert field in message
    assert "expected" in message or "power of two" in message


def test_invalid_cmdline_regex_names_the_rule_field(tmp_path: Path) -> None:
    message = load_error(
        tmp_path, 'services:\n  rules:\n    - {name: a, cmdline: "payments(.*jar"}\n'
    )
    assert "services.rules.0.cmdline" in message
    assert "not a valid regular expression" in message


def test_invalid_cgroup_regex_names_the_rule_field(tmp_path: Path) -> None:
    rules = "services:\n  rules:\n    - {name: a, comm: a}\n    - {name: b, cgroup: '[x'}\n"
    assert "services.rules.1.cgroup" in load_error(tmp_path, rules)


def test_rule_without_matcher_is_rejected(tmp_path: Path) -> None:
    message = load_error(tmp_path, "services:\n  rules:\n    - {name: lonely}\n")
    assert "services.rules.0" in message
    assert "add at least one of exe, comm, cmdline, cgroup" in message


def test_rule_without_name_is_rejected(tmp_path: Path) -> None:
    message = load_error(tmp_path, "services:\n  rules:\n    - {comm: java}\n")
    assert "services.rules.0.name" in message and "Field required" in message


def test_comm_longer_than_the_kernel_keeps_is_rejected(tmp_path: Path) -> None:
    message = load_error(
        tmp_path, "services:\n  rules:\n    - {name: a, comm: a-very-long-command}\n"
    )
    assert "services.rules.0.comm" in message
    assert "'a-very-long-com'" in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    message = load_error(tmp_path, "log_level: loud\nring: {size_bytes: 3}\nfilter: {ports: [0]}\n")
    assert "3 problems" in message
    assert "log_level" in message and "'debug', 'info', 'warning' or 'error'" in message
    assert "ring.size_bytes" in message
    assert "filter.ports.0" in message and "1..65535" in message


@pytest.mark.parametrize(("text", "mode"), [("bpf_stats: on", "on"), ("bpf_stats: off", "off"),
                                           ("bpf_stats: sampled", "sampled"), ("{}", "sampled")])
def test_bpf_stats_reads_yaml_on_and_off_as_written(tmp_path: Path, text: str, mode: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    assert load_config(path).bpf_stats == mode


def test_bpf_stats_names_its_choices(tmp_path: Path) -> None:
    message = load_error(tmp_path, "bpf_stats: sometimes\n")
    assert "bpf_stats" in message and "'on', 'sampled' or 'off'" in message


def test_log_level_is_case_insensitive() -> None:
    assert config_from_mapping({"log_level": "WARNING"}).log_level == "warning"


def test_filter_entries_are_validated_one_by_one(tmp_path: Path) -> None:
    message = load_error(tmp_path, "filter:\n  pids: [1, 0]\n  cgroups: [/ok, relative/path]\n")
    assert "filter.pids.1" in message
    assert "filter.cgroups.1" in message and "absolute cgroup v2 path" in message


def test_filter_cgroups_accept_paths_and_numeric_ids() -> None:
    config = config_from_mapping({"filter": {"cgroups": ["/a/b/", "77", 12]}})
    assert config.filter.cgroups == ("/a/b", 77, 12)


def test_pinning_is_not_a_setting(tmp_path: Path) -> None:
    # The agent never pins: probes must not outlive it (see README "Lifecycle").
    assert "pin_path: unknown field" in load_error(tmp_path, "pin_path: /sys/fs/bpf/x\n")


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:9464\nring:\n  size_bytes: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:\d+:\d+: invalid YAML"):
        load_config(path)


def test_tab_indentation_error_points_at_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ring:\n\tsize_bytes: 4096\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:2:\d+: invalid YAML"):
        load_config(path)


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("\n\njust text\n", "str")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    message = load_error(tmp_path, text)
    assert "top level must be a mapping" in message and kind in message
    assert f"{tmp_path / 'probewire.yaml'}:" in message


def test_duplicate_key_is_an_error_not_last_one_wins(tmp_path: Path) -> None:
    message = load_error(tmp_path, "listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n")
    assert "'listen' twice" in message and ":2:" in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found") as caught:
        load_config(tmp_path / "absent.yaml")
    assert caught.value.exit_code == EXIT_USAGE


def test_directory_instead_of_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="directory"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:80", ("::", 80)),
        (" [fe80::1]:8080 ", ("fe80::1", 8080)),
    ],
)
def test_parse_listen_accepts_host_port_and_bracketed_ipv6(
    value: str, expected: tuple[str, int]
) -> None:
    assert parse_listen(value) == expected
    assert config_from_mapping({"listen": value}).listen_address == expected


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        ("127.0.0.1", "no port"),
        ("127.0.0.1:0", "1..65535"),
        ("127.0.0.1:65536", "1..65535"),
        ("127.0.0.1:http", "1..65535"),
        (":9464", "empty or blank host"),
        ("::1:9464", "brackets"),
        ("[::1]9464", "[::1]:9464"),
        ("[not-v6]:80", "not an IPv6 address"),
        ("", "no port"),
    ],
)
def test_parse_listen_rejects_with_a_fix(value: str, fix: str) -> None:
    with pytest.raises(ConfigError, match=r"^listen: ") as caught:
        parse_listen(value)
    assert fix in str(caught.value)
    with pytest.raises(ConfigError, match=r"listen: .*"):
        config_from_mapping({"listen": value}, source="cli")


@given(
    host=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
    port=st.integers(min_value=1, max_value=65535),
)
def test_parse_listen_round_trips(host: str, port: int) -> None:
    assert parse_listen(f"{host}:{port}") == (host, port)


@given(st.text(max_size=40))
def test_parse_listen_only_ever_raises_config_error(text: str) -> None:
    try:
        host, port = parse_listen(text)
    except ConfigError:
        return
    assert host and 1 <= port <= 65535


def test_l7_protocols_must_be_known_ones(tmp_path: Path) -> None:
    message = load_error(tmp_path, "probes:\n  l7: {protocols: [http, kafka]}\n")
    assert "probes.l7.protocols" in message
    assert "unknown protocol(s) 'kafka'" in message and "http2" in message


def test_l7_protocols_can_be_narrowed() -> None:
    config = config_from_mapping({"probes": {"l7": {"protocols": ["http2", "http", "http2"]}}})
    assert config.probes.l7.protocols == ("http2", "http")
    assert config_from_mapping({}).probes.l7.protocols is None  # every registered protocol
