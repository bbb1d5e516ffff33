"""The plugin-manager factory: built-in plugins, installed entry points and a drop-in directory."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
import structlog

from gateway.errors import StartupError
from gateway.settings import Settings
from plugins import hookspecs

log = structlog.get_logger(__name__)

#: The ``importlib.metadata`` entry-point group installed plugins declare.
ENTRYPOINT_GROUP = "pacs_triage"
#: Set to 1 to log every hook call and its outcome.
TRACE_ENV = "PACS_TRIAGE_TRACE_PLUGINS"
#: Built-in plugin modules, registered under their last name component (``asg_mammonet``, ...);
#: ``plugins.disabled`` blocks them by that name.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "plugins.builtin.notify",
    "plugins.builtin.asg_mammonet",
    "plugins.builtin.clgb_net",
    "plugins.builtin.lem",
    "plugins.builtin.hybrid_birads",
    "plugins.builtin.us_fusion",
)
_DROP_IN_MODULE_PREFIX = "pacs_triage_dropin_"


def get_plugin_manager(
    settings: Settings | None = None, *, load_entrypoints: bool = True
) -> pluggy.PluginManager:
    """Build the plugin manager: hookspecs, built-ins, entry points, then the drop-in directory.

    :param settings: ``plugins.disabled``, ``plugins.load_entrypoints`` and ``plugins.drop_in_dir``
        are read from it; the defaults when ``None``.
    :param load_entrypoints: False skips installed plugins whatever the settings say (tests).
    :raises StartupError: naming the plugin when one cannot be imported or registered, or
        implements a ``pacs_triage_*`` hook that has no spec (e.g. a misspelt hook name).
    """
    settings = settings if settings is not None else Settings()
    pm = pluggy.PluginManager(ENTRYPOINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in settings.plugins.disabled:
        pm.set_blocked(name)
    for module_name in BUILTIN_PLUGINS:
        name = module_name.rsplit(".", 1)[-1]
        if not pm.is_blocked(name):
            module = _import_builtin(module_name)
            if module is not None:
                _register(pm, module, name, module_name)
    if load_entrypoints and settings.plugins.load_entrypoints:
        try:
            pm.load_setuptools_entrypoints(ENTRYPOINT_GROUP)
        except Exception as exc:  # an installed plugin's import can raise anything
            raise StartupError(
                f"loading installed plugins (entry-point group {ENTRYPOINT_GROUP!r}) failed: {exc!r}"
            ) from exc
    if settings.plugins.drop_in_dir is not None:
        _load_drop_ins(pm, Path(settings.plugins.drop_in_dir))
    if os.environ.get(TRACE_ENV, "") not in ("", "0"):
        pm.add_hookcall_monitoring(_trace_before, _trace_after)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise StartupError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    return pm


def _import_builtin(module_name: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # the module exists but one of its imports is missing
            raise StartupError(f"built-in plugin {module_name} cannot be imported: {exc}") from exc
        log.warning("plugin.builtin_missing", module=module_name)
        return None


def _register(pm: pluggy.PluginManager, plugin: object, name: str, origin: str) -> None:
    try:
        pm.register(plugin, name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise StartupError(f"plugin {name!r} from {origin} cannot be registered: {exc}") from exc


def _load_drop_ins(pm: pluggy.PluginManager, directory: Path) -> None:
    """Register every module (``x.py``) and package (``x/__init__.py``) in *directory* as plugin ``x``."""
    if not directory.is_dir():
        raise StartupError(f"plugins.drop_in_dir {directory} is not a directory")
    for path in sorted(directory.iterdir()):
        if path.name.startswith(("_", ".")):
            continue
        if path.is_file() and path.suffix == ".py":
            name, init, search = path.stem, path, None
        elif path.is_dir() and (path / "__init__.py").is_file():
            name, init, search = path.name, path / "__init__.py", [str(path)]
        else:
            continue
        if pm.is_blocked(name):
            continue
        module_name = _DROP_IN_MODULE_PREFIX + name
        spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=search)
        if spec is None or spec.loader is None:
            raise StartupError(f"drop-in plugin {path} cannot be loaded")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # packages import their own submodules through this
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the drop-in's own code can raise anything
            del sys.modules[module_name]
            raise StartupError(f"drop-in plugin {path} failed to import: {exc!r}") from exc
        _register(pm, module, name, str(path))


def _trace_before(hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
    # Argument names only: values can be predictions or study UIDs.
    log.info(
        "plugin.hook.call",
        hook=hook_name,
        plugins=[impl.plugin_name for impl in hook_impls],
        args=sorted(kwargs),
    )


def _trace_after(
    outcome: pluggy.Result[Any],
    hook_name: str,
    hook_impls: Sequence[pluggy.HookImpl],
    kwargs: Mapping[str, Any],
) -> None:
    error = outcome.exception
    log.info("plugin.hook.done", hook=hook_name, error=None if error is None else repr(error))
