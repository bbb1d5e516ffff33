"""Training and evaluation of the model plugins: data-set adapters, patient-level splits, the papers'
recipes, the training loop, evaluation through the plugin's own inference path, and the papers' metrics.

The package sits above :mod:`plugins` (it imports the plugins, never the reverse) and needs the
``training`` extra (scikit-learn, matplotlib).  ``datasets`` loads without torch; ``metrics`` without
torch too; ``recipes``, ``models``, ``registry``, ``trainer`` and ``evaluate`` import torch.
"""

from __future__ import annotations
