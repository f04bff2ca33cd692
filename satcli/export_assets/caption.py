"""Caption images with a model exported by `satcli export`, using only torch and Pillow (greedy decoding).

    python caption.py EXPORT_FOLDER photo.jpg [more.jpg ...]

Prints `path<TAB>caption` per image. The loop below is the whole decoder: start from <start>, feed the best word
back until <end> or max_length, never writing <unk>. satcli's own decoding adds beam search on the same step.
"""

import json
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps


def load(folder):
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    vocab = json.loads((folder / "vocab.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated; loading still works
        modules = {name: torch.jit.load(str(folder / f"{name}.pt")).eval() for name in ("encoder", "start", "step")}
    return config, vocab, modules


def pixels(path, config):
    """An image file -> uint8 (3, S, S), prepared as satcli prepares it."""
    size = config["preprocessing"]["image_size"]
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    with Image.open(path) as im:
        if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
            im.draft(im.mode, (size, size))
        im = ImageOps.exif_transpose(im).convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), filters[config["preprocessing"]["interpolation"]])
        return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


@torch.no_grad()
def caption(paths, config, vocab, modules, max_length=50):
    """Greedy captions of image files: one list of words per image."""
    tokens_of = config["tokens"]
    images = torch.stack([pixels(p, config) for p in paths])
    features = modules["encoder"](images)
    keys, h, c = modules["start"](features)
    word = torch.full((len(paths), 1), tokens_of["start"], dtype=torch.long)
    words, done = [[] for _ in paths], [False] * len(paths)
    for _ in range(max_length):
        logprobs, h, c, _alpha = modules["step"](word, h, c, features, keys)
        logprobs[..., tokens_of["unk"]] = float("-inf")
        word = logprobs.argmax(dim=-1)  # (B, 1)
        for i, token in enumerate(word[:, 0].tolist()):
            if token == tokens_of["end"]:
                done[i] = True
            elif not done[i]:
                words[i].append(vocab[token])
        if all(done):
            break
    return words


if __name__ == "__main__":
    config, vocab, modules = load(sys.argv[1])
    for path, words in zip(sys.argv[2:], caption(sys.argv[2:], config, vocab, modules), strict=True):
        print(f"{path}\t{' '.join(words)}")
