"""Validation of a job's ``resource_options`` against the configured ``parameters``.

The error strings are part of the wire contract (``422 "Invalid resource options found:
[...]"``): required checks first, then each given option in the order given; a type error
skips that option's other checks; unknown option names are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.config import ParameterConfig


def _type_name(value: Any) -> str:
    # JSON values arrive as Python objects; the contract names them by Python's type name
    # (so ``true`` is a bool, never an int).
    return type(value).__name__


def _show(value: Any) -> str:
    return str(value)


def validate_resource_options(
    parameters: list[ParameterConfig], options: Mapping[str, Any]
) -> list[str]:
    by_name = {p.variable_name: p for p in parameters}
    errors = [
        f"Missing required: {p.variable_name}"
        for p in parameters
        if p.validation.required and p.variable_name not in options
    ]
    for name, value in options.items():
        param = by_name.get(name)
        if param is None:
            continue
        rules = param.validation
        if rules.type is not None and _type_name(value) != rules.type:
            errors.append(
                f"{name}: Value '{_show(value)}' of type {_type_name(value)} does not match "
                f"required type {rules.type}. Skipping further validation of parameter {name}."
            )
            continue
        comparable = isinstance(value, int | float) and not isinstance(value, bool)
        if rules.min is not None and comparable and value < rules.min:
            errors.append(f"{name}: Value '{_show(value)}' not above minimum of {rules.min}.")
        if rules.max is not None and comparable and value > rules.max:
            errors.append(f"{name}: Value '{_show(value)}' above maximum of {rules.max}.")
    return errors


def effective_options(
    parameters: list[ParameterConfig], options: Mapping[str, Any]
) -> dict[str, Any]:
    """The options a job runs with: configured defaults, overridden by what was given,
    unknown names dropped."""
    result = {p.variable_name: p.default_value for p in parameters if p.default_value is not None}
    result.update({k: v for k, v in options.items() if k in {p.variable_name for p in parameters}})
    return result
