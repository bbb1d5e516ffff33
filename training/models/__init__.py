"""One module per built-in model: its training recipe and the losses, samplers, augmentations and
schedules the recipe assembles.  Each implements ``pacs_triage_training_recipes``
(:mod:`training.registry` registers them on the plugin manager); inference never imports them.
"""
