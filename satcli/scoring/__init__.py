"""What a caption is worth: caption metrics, object metrics, grounding, the one decode-and-score loop, and the
evaluate job (docs/architecture.md)."""
