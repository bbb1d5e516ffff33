"""Import rules: the gateway never pulls in torch, the plugins or the workers."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import gateway

GATEWAY_MODULES = sorted(f"gateway.{m.name}" for m in pkgutil.iter_modules(gateway.__path__))


@pytest.mark.parametrize("module", GATEWAY_MODULES)
def test_gateway_module_imports_without_torch_plugins_or_workers(module: str) -> None:
    code = (f"import {module}, sys; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'timm', 'plugins', 'workers', 'celery')]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
