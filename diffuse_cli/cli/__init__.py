"""The `diffuse` command: its options, the console it prints to, and each command parsing, calling the API
(diffuse_cli/api.py) and presenting the result."""
