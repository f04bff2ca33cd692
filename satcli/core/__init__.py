"""What every layer uses: atomic writes, errors, the console, devices, step logs, the remembered model, the version
(docs/architecture.md)."""
