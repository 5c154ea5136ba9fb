"""security: config validation names the rule and the field; the default rule set; `probewire
run` exits 2 on a bad rule before it needs any privilege."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from probewire.config import config_from_mapping, load_config
from probewire.errors import ConfigError
from probewire.security.defaults import DEFAULT_RULE_IDS

DEFAULT_IDS = ("reverse_shell", "shell_from_network_server", "exec_from_temp_dir",
               "fileless_exec", "crypto_miner", "network_tool_by_service",
               "package_manager_in_container")


def rules(*rules: dict[str, Any], **security: Any) -> dict[str, Any]:
    return {"security": {"rules": list(rules), **security}}


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    return str(info.value)


def test_default_rule_ids_are_exactly_the_documented_ones() -> None:
    assert DEFAULT_RULE_IDS == DEFAULT_IDS
    effective = config_from_mapping({}).security.effective_rules()
    assert tuple(r.id for r in effective) == DEFAULT_IDS
    assert all(r.action == "alert" for r in effective)  # enforcement is off by default
    docs = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    for rule_id in DEFAULT_IDS:
        assert f"### `{rule_id}`" in docs  # each documented with its false positives


@pytest.mark.parametrize(("rule", "expected"), [
    ({"id": "mine", "match": {"exe_basename": ["x"], "colour": "red"}},
     "rule 'mine': match.colour: unknown field; known fields are: exe, exe_basename"),
    ({"id": "mine", "match": {"exe_basename": ["x"]}, "colour": "red"},
     "rule 'mine': colour: unknown field; known fields are: id, severity"),
    ({"id": "mine", "match": {"argv": "stratum+(tcp"}},
     "rule 'mine': match.argv: 'stratum+(tcp' is not a valid regular expression"),
    ({"id": "mine", "match": [{"exe_basename": ["x"]}, {"argv": "("}]},
     "rule 'mine': match.1.argv: '(' is not a valid regular expression"),
    ({"id": "mine", "match": {"exe_basename": ["x"]}, "action": "block"},
     "rule 'mine': action: unknown action 'block'; use alert or kill"),
    ({"id": "mine", "match": {"exe_basename": ["x"], "argv": "y"}, "action": "kill"},
     "rule 'mine': match.argv: action kill needs criteria the kernel decides at exec"),
    ({"id": "mine", "match": {"exe_basename": ["x"]}, "action": "kill",
      "except": [{"exe_basename": ["y"]}]},
     "rule 'mine': except: a kill rule is decided in the kernel"),
    ({"id": "mine", "match": {"exe_basename": ["x"]}, "severity": "urgent"},
     "rule 'mine': severity: Input should be 'critical', 'high', 'medium', 'low' or 'info'"),
    ({"id": "Mine!", "match": {"exe_basename": ["x"]}},
     "rule 'Mine!': id: 'Mine!' is not a rule id"),
    ({"id": "mine", "match": {}},
     "rule 'mine': match: an empty match matches every process"),
    ({"id": "mine", "match": {"exe_dir": ["tmp"]}},
     "rule 'mine': match.exe_dir: 'tmp' is not an absolute directory"),
    ({"id": "mine", "match": {"listening_ancestor": 9}},
     "rule 'mine': match.listening_ancestor: Input should be less than or equal to 8"),
    ({"id": "mine", "match": {"connects_to": {"addresses": ["300.1.1.1"]}}},
     "rule 'mine': match.connects_to.addresses: '300.1.1.1' is not an IP address"),
    ({"id": "mine", "match": {"ancestor": {"depth": 2}}},
     "rule 'mine': match.ancestor: give at least one of exe, exe_basename, service"),
    ({"match": {"exe_basename": ["x"]}}, "a rule without an id: id: Field required"),
])
def test_a_bad_rule_is_an_error_naming_the_rule_and_the_field(rule: dict[str, Any],
                                                              expected: str) -> None:
    message = error_of(rules(rule))
    assert "security.rules.0: " + expected in message


def test_rule_set_errors() -> None:
    same = {"id": "twice", "match": {"exe_basename": ["x"]}}
    assert "the id 'twice' is used twice" in error_of(rules(same, same))
    assert "disabled_rules: 'nope' is not a built-in rule" in error_of(
        {"security": {"disabled_rules": ["nope"]}})
    many = [{"id": f"r{i}", "match": [{"exe_basename": [f"a{i}"]}, {"exe_basename": [f"b{i}"]},
                                      {"exe_basename": [f"c{i}"]}]} for i in range(19)]
    # 19 x 3 alternatives + the 9 of the default rules = 66 > 64 kernel clause bits.
    assert "66 match alternatives in all; the kernel holds 64" in error_of(rules(*many))
    assert config_from_mapping(rules(*many, default_rules=False))
    assert "300 distinct uids in all; the kernel's map holds 256" in error_of(
        rules({"id": "uids", "match": {"uid": list(range(300))}}))


def test_user_rules_add_to_replace_and_disable_defaults() -> None:
    mine = {"id": "reverse_shell", "severity": "low", "match": {"exe_basename": "bash",
                                                                "stdio_tcp": True}}
    extra = {"id": "no_curl", "match": {"exe_basename": ["curl"]}, "action": "kill"}
    sec = config_from_mapping(rules(mine, extra, disabled_rules=["crypto_miner"])).security
    effective = {r.id: r for r in sec.effective_rules()}
    assert "crypto_miner" not in effective
    assert effective["reverse_shell"].severity == "low"
    assert effective["reverse_shell"].alternatives[0].exe_basename == ("bash",)
    assert effective["no_curl"].action == "kill"
    assert config_from_mapping({"security": {"enabled": False}}).security.effective_rules() == ()


@pytest.mark.parametrize(("rule", "expected"), [
    ("{id: miner_argv, match: {exe_basename: [xmrig], colour: red}}",
     "rule 'miner_argv': match.colour: unknown field"),
    ("{id: miner_argv, match: {argv: 'stratum+(tcp'}}",
     "rule 'miner_argv': match.argv: 'stratum+(tcp' is not a valid regular expression"),
    ("{id: miner_argv, match: {exe_basename: [xmrig]}, action: block}",
     "rule 'miner_argv': action: unknown action 'block'; use alert or kill"),
], ids=["unknown_key", "bad_regex", "unknown_action"])
def test_cli_exits_2_on_a_bad_rule_naming_it(tmp_path: Path, rule: str, expected: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"security:\n  rules:\n    - {rule}\n")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(cfg)
    proc = subprocess.run([sys.executable, "-m", "probewire.cli", "run", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert expected in " ".join(proc.stderr.split())  # rich wraps long lines
