"""RAMP data generation (Retrieval-Augmented Mask Prediction, MaskSearch arXiv 2505.20285).

extractors.py  propose salient spans (offline regex rules + annotations, or an LLM)
masking.py     validate spans, choose k and which spans (without replacement), mask, restore
ppl.py         score spans with a causal LM for the harder PPL-masking variant
pipeline.py    the resumable generation job (``masksearch-rl ramp generate``)
export.py      RAMP items -> verl RL parquet (``masksearch-rl ramp export``)
"""
