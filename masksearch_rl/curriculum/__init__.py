"""Masked-span-count curriculum for RAMP RL training.

``sampler`` is the library (no verl trainer import). The verl trainer mode ``masksearch_curriculum`` that wires it
into verl's train dataloader lives with our other verl extensions, in :mod:`masksearch_rl.verl_ext.curriculum_trainer`
(verl loads it through our ``verl.plugins`` entry point, masksearch_rl/verl_plugins.py).
"""

from masksearch_rl.curriculum.sampler import (
    CURRICULUM_MODES,
    CurriculumConfig,
    MaskCountCurriculumSampler,
    read_num_masks,
)

__all__ = ["CURRICULUM_MODES", "CurriculumConfig", "MaskCountCurriculumSampler", "read_num_masks"]
