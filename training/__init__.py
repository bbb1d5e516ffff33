"""Training and evaluation: dataset adapters, patient-level splits, the papers' metrics, recipes and the loop.

``datasets`` and ``metrics`` use numpy, pydicom and OpenCV only and load without torch; ``recipes``,
``trainer`` and ``evaluate`` import torch.
"""

from __future__ import annotations
