"""Several captioners decoding as one: at every step the ensemble writes from the mean of its members' word
probabilities, log p(w) = log (1/M Σ_m p_m(w)), as ensembles of seeds or checkpoints are decoded in the
captioning literature (Vinyals et al. 2015; the Bottom-Up/SCST reports) and in machine translation.

The members read the same features (one encoder, input size and grid: one cached feature file serves them all),
so the ensemble is a :class:`~models.decoding.StepModel` beam search takes as it takes one captioner. Its state is
the members' LSTM states side by side, one flat tuple of (B, K, H) tensors, which beam search reorders as it
reorders one model's; the attention it reports is the members' mean, a distribution over the same cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.captioner import Captioner, Memory, State


class Ensemble(nn.Module):
    """Average the word probabilities of ``members`` at every step. Build with ``Ensemble([a, b, c])``."""

    def __init__(self, members: Sequence[Captioner]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        first = members[0]
        for other in members[1:]:
            for key in ("vocab_size", "encoder", "image_size", "grid_size", "start_id", "end_id", "pad_id"):
                if getattr(other.config, key) != getattr(first.config, key):
                    raise ValueError(f"ensemble members differ in {key}: {getattr(first.config, key)!r} and "
                                     f"{getattr(other.config, key)!r}")
        self.members = nn.ModuleList(members)
        self.config = first.config
        self.grid_shape = first.grid_shape

    def encode(self, images: Tensor) -> Tensor:
        """The first member's encoder (all members share its weights when their encoders were frozen)."""
        return self.members[0].encode(images)

    def prepare(self, features: Tensor) -> tuple[Memory, ...]:
        return tuple(member.prepare(features) for member in self.members)

    def init_state(self, memory: tuple[Memory, ...], n_beams: int = 1) -> tuple[Tensor, ...]:
        return tuple(t for member, m in zip(self.members, memory, strict=True) for t in member.init_state(m, n_beams))

    def step(self, tokens: Tensor, state: tuple[Tensor, ...],
             memory: tuple[Memory, ...]) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        """tokens (B, K) → log of the mean word probability (B, K, V), the new states, mean attention (B, K, L)."""
        logprobs, alphas, states = [], [], []
        width = len(State._fields)  # each member's (h, c), side by side in the flat state
        for i, (member, m) in enumerate(zip(self.members, memory, strict=True)):
            lp, new_state, alpha = member.step(tokens, State(*state[width * i: width * (i + 1)]), m)
            logprobs.append(lp.float())
            alphas.append(alpha.float())
            states.extend(new_state)
        mean = torch.stack(logprobs).logsumexp(dim=0) - math.log(len(logprobs))
        return mean, tuple(states), torch.stack(alphas).mean(dim=0)

