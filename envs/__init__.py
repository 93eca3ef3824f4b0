"""Search environment for verl: agent loop(s) for the think/search/information/answer protocol and a search tool."""
