"""What one caption costs: the encoder against beam search, and what computing the attention's encoder-side
projection once per image (satcli) instead of at every decoding step (the best-known PyTorch tutorial) saves.

    python -m bench.decode_cost [--repeats 5] [--write]

Both searches run the same model and the same batched beam search and produce identical captions; the only
difference is where ``W_a a_i`` is computed. Weights are random (timing only), so captions run to
``--max-length`` steps: the step count is printed and is the same for both variants.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import command, machine, median_seconds, write_section
from models.captioner import Captioner, CaptionerConfig, Memory
from models.decoding import decode


class PerStepProjection(Captioner):
    """The tutorial's way: the encoder-side attention projection is recomputed for every beam at every step."""

    def prepare(self, features):
        return Memory(features, None)

    def step(self, tokens, state, memory):
        keys = self.decoder.attention.key(memory.features.unsqueeze(1).expand(-1, tokens.shape[1], -1, -1))
        keys = keys.mean(dim=1)  # same values as projecting once; the cost of K projections is paid
        return super().step(tokens, state, Memory(memory.features, keys))


def measure(name: str, image_size: int, grid: int | None, batch: int, beam: int, max_length: int,
            repeats: int) -> dict:
    config = CaptionerConfig(vocab_size=2633, encoder=name, image_size=image_size, grid_size=grid, dropout=0.0)
    ours = Captioner(config).eval()
    peer = PerStepProjection(config).eval()
    peer.load_state_dict(ours.state_dict())
    images = torch.randn(batch, 3, image_size, image_size)
    with torch.inference_mode():
        features = ours.encode(images)
        a = decode(ours, features, beam_size=beam, max_length=max_length)
        b = decode(peer, features, beam_size=beam, max_length=max_length)
    assert [r.tokens for r in a] == [r.tokens for r in b], "both variants must find the same captions"
    encode_s = median_seconds(lambda: ours.encode(images), repeats)
    ours_s = median_seconds(lambda: decode(ours, features, beam_size=beam, max_length=max_length), repeats)
    peer_s = median_seconds(lambda: decode(peer, features, beam_size=beam, max_length=max_length), repeats)
    steps = max(len(r.tokens) + r.best.finished for r in a)
    return dict(name=name, image_size=image_size, grid=ours.grid_shape, batch=batch, beam=beam, steps=steps,
                encode_ms=1000 * encode_s / batch, ours_ms=1000 * ours_s / batch, peer_ms=1000 * peer_s / batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, size, grid in (("resnet101", 256, 14), ("efficientnet-lite0", 224, None)):
        for batch in (1, 16):
            rows.append(measure(name, size, grid, batch, 3, args.max_length, args.repeats))
            print(rows[-1], flush=True)
    lines = [
        f"Command: `{command()}`  ",
        f"Machine: {machine()}",
        "",
        "Per image, beam size 3, random weights (captions run to the step cap), vocabulary 2633 (Flickr8k-sized),"
        " decoder 512/512/512. *Projection once* is satcli; *per step* recomputes the encoder-side attention"
        " projection for every beam at every step, as the best-known PyTorch tutorial does. Same captions.",
        "",
        "| encoder | input | grid | images per batch | steps | encoder ms | beam search ms (once) |"
        " beam search ms (per step) | per step / once | search / encoder (once) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['image_size']} | {r['grid'][0]}×{r['grid'][1]} | {r['batch']} | {r['steps']} | "
            f"{r['encode_ms']:.1f} | {r['ours_ms']:.1f} | {r['peer_ms']:.1f} | {r['peer_ms'] / r['ours_ms']:.2f}× | "
            f"{r['ours_ms'] / r['encode_ms']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("Decoding cost per image (bench/decode_cost.py)", table)


if __name__ == "__main__":
    main()
