"""The files satcli writes and reads back: results files and checkpoints (docs/formats.md, docs/architecture.md)."""
