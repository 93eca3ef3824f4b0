"""Masked-span-count curriculum for RAMP RL training.

``sampler`` is the library (no verl trainer import); ``trainer`` is the verl trainer mode ``masksearch_curriculum``
that wires the sampler into verl's train dataloader. Importing this package does not import ``trainer``: verl loads
it through our ``verl.plugins`` entry point (masksearch_rl/verl_plugins.py).
"""

from masksearch_rl.curriculum.sampler import (
    CURRICULUM_MODES,
    CurriculumConfig,
    MaskCountCurriculumSampler,
    read_num_masks,
)

__all__ = ["CURRICULUM_MODES", "CurriculumConfig", "MaskCountCurriculumSampler", "read_num_masks"]
