"""Package data: YAML configs of the search environment (search_tool.yaml, agent_loops.yaml)."""
