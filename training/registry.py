"""Which recipe trains which model: every recipe a plugin brings through ``pacs_triage_training_recipes``.

The built-in recipes (:mod:`training.models`) are plugins like any other: :func:`register_builtin_recipes`
registers them on the plugin manager as ``training.<model>``, and an installed or drop-in plugin that
implements the same hook adds its own.  A plugin named in ``plugins.disabled`` is left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import pluggy

from gateway.settings import Settings
from plugins.base import TorchModelPlugin
from plugins.manager import get_plugin_manager
from training.models import asg_mammonet, clgb_net, hybrid_birads, lem, us_fusion
from training.recipes import DemoProfile, Recipe

__all__ = [
    "BUILTIN_RECIPE_PLUGINS",
    "demo_profiles",
    "get_recipe",
    "recipe_class",
    "recipe_classes",
    "register_builtin_recipes",
]

#: The built-in recipe modules, registered as ``training.<model>``.
BUILTIN_RECIPE_PLUGINS: tuple[ModuleType, ...] = (asg_mammonet, clgb_net, lem, hybrid_birads, us_fusion)


def register_builtin_recipes(plugin_manager: pluggy.PluginManager) -> pluggy.PluginManager:
    """Register the built-in recipe modules on *plugin_manager* (once; blocked names are skipped).

    :param plugin_manager: from :func:`plugins.manager.get_plugin_manager`, e.g. a host's.
    :returns: the same manager.
    """
    for module in BUILTIN_RECIPE_PLUGINS:
        name = "training." + module.__name__.rsplit(".", 1)[-1]
        if plugin_manager.is_registered(module) or plugin_manager.is_blocked(name):
            continue
        plugin_manager.register(module, name)
    return plugin_manager


def recipe_classes(plugin_manager: pluggy.PluginManager | None = None) -> dict[str, type[Recipe]]:
    """Every recipe the plugins bring, by the name of the model it trains.

    :param plugin_manager: whose plugins to ask; a new one from the default settings when None.
    :raises ValueError: when a hook returns something that is not a :class:`Recipe` subclass, or two
        recipes train the same model.
    """
    manager = register_builtin_recipes(
        plugin_manager if plugin_manager is not None else get_plugin_manager(Settings())
    )
    recipes: dict[str, type[Recipe]] = {}
    # pluggy calls the last registered plugin first; reversed, the built-ins come first.
    for returned in reversed(manager.hook.pacs_triage_training_recipes()):
        for recipe in returned or ():
            if not (isinstance(recipe, type) and issubclass(recipe, Recipe)):
                raise ValueError(f"pacs_triage_training_recipes returned {recipe!r}, not a Recipe subclass")
            if recipe.name in recipes and recipes[recipe.name] is not recipe:
                raise ValueError(
                    f"two recipes train model {recipe.name!r}: {recipes[recipe.name].__qualname__} "
                    f"and {recipe.__qualname__}"
                )
            recipes[recipe.name] = recipe
    return recipes


def recipe_class(name: str, plugin_manager: pluggy.PluginManager | None = None) -> type[Recipe]:
    """The recipe class that trains model *name*.

    :param name: the model plugin's name.
    :param plugin_manager: as for :func:`recipe_classes`.
    :raises ValueError: naming the models that have recipes, when *name* has none.
    """
    recipes = recipe_classes(plugin_manager)
    if name not in recipes:
        raise ValueError(
            f"no training recipe for model {name!r}; recipes exist for {', '.join(sorted(recipes))}"
        )
    return recipes[name]


def get_recipe(
    plugin: TorchModelPlugin,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    input_size: tuple[int, int] | None = None,
) -> Recipe:
    """The recipe that trains *plugin*, with overrides.

    :param plugin: a registered model plugin.
    :param plugin_manager: whose recipes to use (a host's ``plugin_manager``); see :func:`recipe_classes`.
    :param hyperparameters: ``--set`` overrides.
    :param options: ``--option`` overrides of the plugin's options.
    :param input_size: model input (height, width).
    :raises ValueError: when no recipe trains this plugin, or an override is invalid.
    """
    recipe = recipe_class(plugin.name, plugin_manager)
    return recipe(plugin, hyperparameters=hyperparameters, options=options, input_size=input_size)


def demo_profiles(plugin_manager: pluggy.PluginManager | None = None) -> dict[str, DemoProfile]:
    """The demo profile of every recipe that has one, by model name (``pacs-triage demo-weights``).

    :param plugin_manager: as for :func:`recipe_classes`.
    """
    return {
        name: recipe.demo_profile
        for name, recipe in recipe_classes(plugin_manager).items()
        if recipe.demo_profile is not None
    }
