"""Hook specifications: the functions a pacs-triage plugin may implement.

Plugins implement them with ``from plugins import hookimpl``.  Hooks are always called with keyword
arguments, so an implementation may accept fewer arguments than the spec names (pluggy's opt-in
arguments) and specs can grow without breaking plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from plugins.base import ModelPlugin
    from plugins.types import Prediction

hookspec = pluggy.HookspecMarker("pacs_triage")


# -------------------------------------------------------------------------
# Model registration hooks
# -------------------------------------------------------------------------


@hookspec
def pacs_triage_register_models() -> list[ModelPlugin]:
    """Return the model plugins this plugin provides.

    Every returned object is a :class:`plugins.base.TorchModelPlugin` subclass instance whose
    ``spec.name`` is unique across all plugins; the host refuses to start on a duplicate name.
    Return the plugin objects only: building the network and loading weights happen lazily, once
    per process, when the host first runs the model.

    .. versionadded:: 0.1

    Use in plugins
    ~~~~~~~~~~~~~~
    Every model plugin implements this hook, usually as
    ``return [MyPlugin(spec) for spec in MODEL_CFGS.values()]``.
    """


# -------------------------------------------------------------------------
# Notification hooks
# -------------------------------------------------------------------------


@hookspec
def pacs_triage_high_risk_study(study_instance_uid: str, risk: float, predictions: list[Prediction]) -> None:
    """Called once per study whose first-stage triage category is ``high`` (workers.triage.decide).

    :param study_instance_uid: The study's Study Instance UID.
    :param risk: The deciding model's risk in [0, 1].
    :param predictions: The predictions that produced the risk.

    Every implementation runs and return values are ignored, but an exception stops the call
    (pluggy runs no further implementations), so an implementation catches and logs its own
    errors.  It never puts patient identifiers (name, ID, birth date) into what it logs or sends.

    .. versionadded:: 0.1

    Use in plugins
    ~~~~~~~~~~~~~~
    Paging, e-mail or chat notifications.  The built-in ``plugins.builtin.notify`` logs a
    ``study.high_risk`` event.
    """


# -------------------------------------------------------------------------
# Training hooks
# -------------------------------------------------------------------------


@hookspec
def pacs_triage_training_recipes() -> list[type]:
    """Return the training recipe classes this plugin provides.

    Each is a subclass of ``training.recipes.Recipe`` whose ``name`` is the model plugin it trains;
    ``pacs-triage train``, ``evaluate`` and ``demo-weights`` refuse two recipes for one model.  The
    runtime never calls this hook (the ``training`` package does), so a plugin imports its training
    code inside the implementation or in a module of its own, and a gateway or worker host that has
    no ``training`` extra still loads it.

    .. versionadded:: 0.1

    Use in plugins
    ~~~~~~~~~~~~~~
    A model plugin that can be trained with ``pacs-triage train``.  The built-in recipes are the
    modules of ``training.models``, registered as ``training.<model>``.
    """
