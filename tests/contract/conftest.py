"""The served OpenAPI description, and a client generated from it by openapi-python-client
(its CLI, offline) into a temporary directory, imported from there."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

PACKAGE = "uws_generated_client"


@pytest.fixture(scope="module")
async def served_schema(client) -> dict[str, Any]:
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200
    return r.json()


def _generator() -> list[str]:
    script = Path(sys.executable).parent / "openapi-python-client"
    return [str(script)] if script.exists() else [sys.executable, "-m", "openapi_python_client"]


@pytest.fixture(scope="module")
def generated(served_schema: dict[str, Any],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The generated package (``--meta none``: the output directory is the package)."""
    base = tmp_path_factory.mktemp("generated")
    spec = base / "openapi.json"
    spec.write_text(json.dumps(served_schema))
    config = base / "config.yaml"
    config.write_text("post_hooks: []\n")  # no formatter runs on the generated code
    done = subprocess.run(
        [*_generator(), "generate", "--path", str(spec), "--output-path", str(base / PACKAGE),
         "--meta", "none", "--config", str(config), "--fail-on-warning"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(base))
    try:
        package = importlib.import_module(PACKAGE)
        assert Path(package.__file__).is_relative_to(base)  # this run's, not an installed one
        for sub in ("models", "types"):
            importlib.import_module(f"{PACKAGE}.{sub}")
        yield package
    finally:
        sys.path.remove(str(base))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]
