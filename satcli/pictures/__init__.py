"""satcli.pictures: see docs/architecture.md."""
