"""Hybrid reward for search agents: format + answer match (EM/F1/recall) or a model judge; verl compute_score entry."""
