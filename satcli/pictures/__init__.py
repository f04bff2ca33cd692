"""What the attention looked like: per-word overlays and the HTML report (docs/architecture.md)."""
