"""Show, Attend and Tell (Xu et al., 2015): soft attention over a CNN feature grid, an LSTM decoder, the
deep output layer and the doubly stochastic attention regulariser.

Read top to bottom: config, attention, decoder, captioner, loss. The model offers a step API for decoding::

    features = model.encode(images)              # (B, n_pixels, dim), once per image
    memory = model.prepare(features)             # encoder-side attention projection, once per image
    state = model.init_state(memory, n_beams)    # LSTM h, c: (B, n_beams, hidden)
    logprobs, state, alpha = model.step(tokens, state, memory)   # (B, n_beams, vocab), ..., (B, n_beams, n_pixels)

and a teacher-forced :meth:`Captioner.forward` for training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.encoders import DEFAULT_ENCODER, ENCODERS, Encoder


@dataclass
class CaptionerConfig:
    """Everything needed to rebuild a captioner; stored in every checkpoint."""

    vocab_size: int
    encoder: str = DEFAULT_ENCODER
    image_size: int | None = None  # None: the encoder's own input size
    grid_size: int | None = None  # adaptive-pool the feature map to grid_size × grid_size (the paper: 14)
    fine_tune_blocks: int = 0  # 0: frozen encoder; N: the top N blocks train; -1: all of it
    attention: str = "soft"
    embed_dim: int = 512
    attention_dim: int = 512
    decoder_dim: int = 512
    dropout: float = 0.5
    deep_output: bool = True  # the paper's L_o(E y + L_h h + L_z z); False: a linear layer on h
    doubly_stochastic: float = 1.0  # λ of the attention regulariser λ Σ_i (1 - Σ_t α_ti)²
    pad_id: int = 0
    start_id: int = 1
    end_id: int = 2

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODERS)}")
        if self.attention != "soft":
            raise ValueError(f"unknown attention {self.attention!r}; this version has 'soft'")
        if self.image_size is None:
            self.image_size = ENCODERS[self.encoder].image_size
        if self.vocab_size <= max(self.pad_id, self.start_id, self.end_id):
            raise ValueError(f"vocab_size {self.vocab_size} leaves no room for the special tokens")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CaptionerConfig:
        """Rebuild from a stored dict, ignoring keys a newer version may have added."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class SoftAttention(nn.Module):
    """Additive attention: e_i = w·tanh(W_a a_i + W_h h); α = softmax(e); context = Σ_i α_i a_i."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim)  # W_a, applied once per image
        self.query = nn.Linear(hidden_dim, attention_dim)  # W_h
        self.score = nn.Linear(attention_dim, 1)  # w

    def forward(self, keys: Tensor, features: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """keys (B, L, A), features (B, L, D), h (B, K, H) → context (B, K, D), alpha (B, K, L)."""
        energy = torch.tanh(keys.unsqueeze(1) + self.query(h).unsqueeze(2))  # (B, K, L, A)
        alpha = self.score(energy).squeeze(-1).softmax(dim=-1)  # (B, K, L)
        return alpha @ features, alpha  # (B, K, D)


class Memory(NamedTuple):
    """What the decoder reads at every step, computed once per image."""

    features: Tensor  # (B, L, D)
    keys: Tensor  # (B, L, A): the encoder-side attention projection


class State(NamedTuple):
    """LSTM state per image and beam."""

    h: Tensor  # (B, K, H)
    c: Tensor  # (B, K, H)


class AttentionDecoder(nn.Module):
    """The LSTM that writes one word per step while attending over the feature grid."""

    def __init__(self, config: CaptionerConfig, feature_dim: int):
        super().__init__()
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.pad_id)
        self.attention = SoftAttention(feature_dim, c.decoder_dim, c.attention_dim)
        self.init_h = nn.Linear(feature_dim, c.decoder_dim)  # h_0 = tanh(f_init,h(mean a))
        self.init_c = nn.Linear(feature_dim, c.decoder_dim)  # c_0 = tanh(f_init,c(mean a))
        self.f_beta = nn.Linear(c.decoder_dim, 1)  # gating scalar β = σ(f_β(h_{t-1}))
        self.lstm = nn.LSTMCell(c.embed_dim + feature_dim, c.decoder_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.deep_output = c.deep_output
        if c.deep_output:
            self.out_h = nn.Linear(c.decoder_dim, c.embed_dim)  # L_h
            self.out_z = nn.Linear(feature_dim, c.embed_dim, bias=False)  # L_z
            self.out = nn.Linear(c.embed_dim, c.vocab_size)  # L_o
        else:
            self.out = nn.Linear(c.decoder_dim, c.vocab_size)

    def prepare(self, features: Tensor) -> Memory:
        return Memory(features, self.attention.key(features))

    def init_state(self, memory: Memory, n_beams: int = 1) -> State:
        mean = memory.features.mean(dim=1)  # (B, D)
        h = torch.tanh(self.init_h(mean)).unsqueeze(1).expand(-1, n_beams, -1)  # (B, K, H)
        c = torch.tanh(self.init_c(mean)).unsqueeze(1).expand(-1, n_beams, -1)
        return State(h.contiguous(), c.contiguous())

    def step(self, tokens: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor]:
        """tokens (B, K) → logits (B, K, V), new state, alpha (B, K, L)."""
        B, K = tokens.shape
        embedded = self.embedding(tokens)  # (B, K, E)
        context, alpha = self.attention(memory.keys, memory.features, state.h)  # (B, K, D), (B, K, L)
        context = torch.sigmoid(self.f_beta(state.h)) * context
        h, c = self.lstm(torch.cat([embedded, context], dim=-1).flatten(0, 1),
                         (state.h.flatten(0, 1), state.c.flatten(0, 1)))
        h, c = h.view(B, K, -1), c.view(B, K, -1)  # (B, K, H)
        if self.deep_output:
            hidden = torch.tanh(embedded + self.out_h(self.dropout(h)) + self.out_z(context))  # (B, K, E)
        else:
            hidden = h
        return self.out(self.dropout(hidden)), State(h, c), alpha


class Captioner(nn.Module):
    """Encoder + attention decoder. Build with ``Captioner(CaptionerConfig(...))``."""

    def __init__(self, config: CaptionerConfig, pretrained_encoder: bool = False):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder, pretrained=pretrained_encoder, grid_size=config.grid_size,
                               fine_tune_blocks=config.fine_tune_blocks)
        self.decoder = AttentionDecoder(config, self.encoder.spec.dim)
        self.grid_shape = self.encoder.grid_shape(config.image_size, config.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images → (B, n_pixels, dim) features."""
        return self.encoder(images)

    def prepare(self, features: Tensor) -> Memory:
        """Per-image work done once before decoding: the attention keys W_a a_i."""
        return self.decoder.prepare(features)

    def init_state(self, memory: Memory, n_beams: int = 1) -> State:
        return self.decoder.init_state(memory, n_beams)

    def step(self, tokens: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor]:
        """One decoding step. tokens (B, K) → logprobs (B, K, V), state, alpha (B, K, n_pixels)."""
        logits, state, alpha = self.decoder.step(tokens, state, memory)
        return logits.float().log_softmax(dim=-1), state, alpha

    def forward(self, features: Tensor, tokens: Tensor, lengths: Tensor,
                sample_prob: float = 0.0) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass over captions.

        features (B, L, D); tokens (B, T+1) = ``<start> w1 … wn <end> <pad>…``; lengths (B,) = number of
        targets (words + 1). Returns logprobs (B, T, V) and alphas (B, T, L), both zero at padded steps.
        Captions are processed longest first and each step only runs the captions still going, so padding
        costs nothing and cannot change the result. ``sample_prob`` > 0 is scheduled sampling: each caption's
        input word is, with that probability, the model's own previous prediction instead of the reference.
        """
        B, L, _ = features.shape
        T = tokens.shape[1] - 1
        sorted_lengths, order = lengths.sort(descending=True)
        n_active = (sorted_lengths.unsqueeze(0) > torch.arange(T, device=lengths.device).unsqueeze(1)).sum(1)
        n_active = n_active.tolist()  # one sync per batch, not per step
        memory = self.prepare(features[order])
        state = self.init_state(memory)
        tokens = tokens[order]
        logits = features.new_zeros(B, T, self.config.vocab_size)
        alphas = features.new_zeros(B, T, L)
        for t in range(T):
            n = n_active[t]
            if n == 0:
                break
            step_memory = Memory(memory.features[:n], memory.keys[:n])
            inputs = tokens[:n, t]
            if sample_prob > 0 and t > 0:
                own = torch.rand(n, device=inputs.device) < sample_prob
                inputs = torch.where(own, logits[:n, t - 1].argmax(dim=-1), inputs)
            step_logits, new_state, alpha = self.decoder.step(
                inputs.unsqueeze(1), State(state.h[:n], state.c[:n]), step_memory)
            logits[:n, t] = step_logits[:, 0]
            alphas[:n, t] = alpha[:, 0]
            state = new_state
        mask = (torch.arange(T, device=lengths.device).unsqueeze(0) < sorted_lengths.unsqueeze(1)).unsqueeze(-1)
        logprobs = logits.float().log_softmax(dim=-1) * mask
        unsort = order.argsort()
        return logprobs[unsort], alphas[unsort]


def doubly_stochastic_penalty(alphas: Tensor) -> Tensor:
    """Σ_i (1 - Σ_t α_ti)² per caption, averaged over the batch. alphas (B, T, L), zero at padded steps."""
    return ((1.0 - alphas.sum(dim=1)) ** 2).sum(dim=1).mean()


def caption_loss(logprobs: Tensor, alphas: Tensor, tokens: Tensor, lengths: Tensor,
                 doubly_stochastic: float) -> tuple[Tensor, Tensor]:
    """Mean token negative log-likelihood plus λ times the attention regulariser.

    logprobs (B, T, V), alphas (B, T, L), tokens (B, T+1), lengths (B,). Returns (loss, nll).
    """
    targets = tokens[:, 1 : logprobs.shape[1] + 1]  # (B, T)
    mask = torch.arange(targets.shape[1], device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    token_logprobs = logprobs.gather(2, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    nll = -(token_logprobs * mask).sum() / mask.sum()
    return nll + doubly_stochastic * doubly_stochastic_penalty(alphas), nll
