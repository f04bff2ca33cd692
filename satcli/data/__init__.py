"""What goes in: datasets, the built-in shapes dataset, the preprocessed store, the feature cache and its views, images,
text and vocabulary (docs/architecture.md)."""
