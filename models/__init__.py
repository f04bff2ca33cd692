"""The captioner: encoders, attention, decoder and decoding. Knows tensors only (torch and torchvision)."""
