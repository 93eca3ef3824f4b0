"""MaskSearch-RL: train LLM search agents with Retrieval-Augmented Mask Prediction (RAMP) on verl."""

__version__ = "0.1.0"
