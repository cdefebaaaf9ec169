"""User-facing tools: the `nixl-connectors` command (demo, doctor, bench). Nothing at run time
of an engine imports this package."""
