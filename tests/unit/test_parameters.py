"""Resource-option validation: the contract's exact error strings and order."""

from __future__ import annotations

import tomllib
from pathlib import Path

from core.config import parse_config
from core.parameters import effective_options, validate_resource_options

ROOT = Path(__file__).resolve().parents[2]
PARAMS = parse_config(tomllib.loads((ROOT / "config.toml").read_text()), "config.toml").parameters


def test_valid_options() -> None:
    assert validate_resource_options(PARAMS, {"num_cpus": 1, "memory_mb": 1024,
                                              "time_limit_min": 480, "gpu_enabled": True}) == []


def test_bounds_are_inclusive_and_messages_exact() -> None:
    assert validate_resource_options(PARAMS, {"num_cpus": 0}) == [
        "num_cpus: Value '0' not above minimum of 1."]
    assert validate_resource_options(PARAMS, {"memory_mb": 99999}) == [
        "memory_mb: Value '99999' above maximum of 8192."]
    assert validate_resource_options(PARAMS, {"time_limit_min": 481}) == [
        "time_limit_min: Value '481' above maximum of 480."]


def test_type_error_skips_further_checks_and_order_follows_input() -> None:
    errors = validate_resource_options(PARAMS, {"memory_mb": 1, "num_cpus": "a"})
    assert errors == [
        "memory_mb: Value '1' not above minimum of 1024.",
        "num_cpus: Value 'a' of type str does not match required type int. "
        "Skipping further validation of parameter num_cpus.",
    ]
    assert str(errors[1:]).startswith('["num_cpus')  # a quote inside: Python uses "..."


def test_bool_is_not_int_and_float_is_not_int() -> None:
    assert validate_resource_options(PARAMS, {"num_cpus": True})[0].startswith(
        "num_cpus: Value 'True' of type bool")
    assert validate_resource_options(PARAMS, {"num_cpus": 2.0})[0].startswith(
        "num_cpus: Value '2.0' of type float")


def test_required_and_unknown() -> None:
    params = [p.model_copy(update={"validation": p.validation.model_copy(
        update={"required": True})}) if p.variable_name == "num_cpus" else p for p in PARAMS]
    errors = validate_resource_options(params, {"whatever": 1})
    assert errors == ["Missing required: num_cpus"]
    assert str(errors) == "['Missing required: num_cpus']"


def test_effective_options_fill_defaults_and_drop_unknown() -> None:
    assert effective_options(PARAMS, {"num_cpus": 3, "bogus": 1}) == {
        "num_cpus": 3, "memory_mb": 1024, "time_limit_min": 180, "gpu_enabled": False}
