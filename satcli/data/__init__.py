"""satcli.data: see docs/architecture.md."""
