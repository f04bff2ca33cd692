"""satcli.core: see docs/architecture.md."""
