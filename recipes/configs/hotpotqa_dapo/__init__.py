"""Stage II recipes: DAPO on HotpotQA (a package so the YAML resolves as ``pkg://recipes.configs.hotpotqa_dapo``)."""
