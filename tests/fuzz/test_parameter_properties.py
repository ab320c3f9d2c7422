"""Property tests: any JSON value as resource options is either accepted with the right
type and within bounds, or refused with the contract's exact 422 text; never an exception.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import ParameterConfig, ParameterValidation
from core.parameters import effective_options, validate_resource_options

PARAMS = [
    ParameterConfig(display_name="CPUs", variable_name="num_cpus", default_value=1,
                    validation=ParameterValidation(type="int", min=1, max=4)),
    ParameterConfig(display_name="Memory", variable_name="memory_mb",
                    validation=ParameterValidation(type="int", min=1024, max=8192,
                                                   required=True)),
    ParameterConfig(display_name="Fraction", variable_name="fraction",
                    validation=ParameterValidation(type="float", min=0.5, max=1.5)),
    ParameterConfig(display_name="GPU", variable_name="gpu_enabled", default_value=False,
                    validation=ParameterValidation(type="bool")),
    ParameterConfig(display_name="Label", variable_name="label",
                    validation=ParameterValidation(type="str")),
    ParameterConfig(display_name="Anything", variable_name="anything"),
]
NAMES = [p.variable_name for p in PARAMS]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=8,
)
options = st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=10), json_values,
                          max_size=8)


def expected_errors(given_options: dict[str, Any],
                    params: list[ParameterConfig] = PARAMS) -> list[str]:
    """The contract's rules, written out independently of core/parameters.py."""
    errors = [f"Missing required: {p.variable_name}" for p in params
              if p.validation.required and p.variable_name not in given_options]
    rules = {p.variable_name: p.validation for p in params}
    for name, value in given_options.items():
        rule = rules.get(name)
        if rule is None:
            continue
        kind = type(value).__name__
        if rule.type is not None and kind != rule.type:
            errors.append(f"{name}: Value '{value}' of type {kind} does not match required "
                          f"type {rule.type}. Skipping further validation of parameter {name}.")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if rule.min is not None and value < rule.min:
            errors.append(f"{name}: Value '{value}' not above minimum of {rule.min}.")
        if rule.max is not None and value > rule.max:
            errors.append(f"{name}: Value '{value}' above maximum of {rule.max}.")
    return errors


@settings(max_examples=400, derandomize=True, database=None)
@given(options)
def test_any_options_are_accepted_or_refused_by_the_contract(given_options: dict) -> None:
    errors = validate_resource_options(PARAMS, given_options)
    assert errors == expected_errors(given_options)
    message = f"Invalid resource options found: {errors}"
    assert message.startswith("Invalid resource options found: [")
    if errors:
        return
    # Accepted: every known option has its declared type and lies within its bounds.
    for param in PARAMS:
        if param.variable_name not in given_options:
            assert not param.validation.required
            continue
        value = given_options[param.variable_name]
        if param.validation.type is not None:
            assert type(value).__name__ == param.validation.type
        if param.validation.min is not None and not isinstance(value, bool):
            assert value >= param.validation.min
        if param.validation.max is not None and not isinstance(value, bool):
            assert value <= param.validation.max


@settings(max_examples=200, derandomize=True, database=None)
@given(options)
def test_effective_options_keep_only_configured_names(given_options: dict) -> None:
    effective = effective_options(PARAMS, given_options)
    assert set(effective) <= set(NAMES)
    for name, value in given_options.items():
        if name in NAMES:
            assert effective[name] == value
    for param in PARAMS:
        if param.variable_name not in given_options and param.default_value is not None:
            assert effective[param.variable_name] == param.default_value


@settings(max_examples=200, derandomize=True, database=None)
@given(json_values)
def test_bools_are_never_taken_for_numbers(value: Any) -> None:
    errors = validate_resource_options(PARAMS, {"num_cpus": value, "memory_mb": 2048})
    accepted = not errors
    assert accepted == (type(value) is int and 1 <= value <= 4)
