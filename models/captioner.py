"""Show, Attend and Tell (Xu et al., 2015): soft or stochastic hard attention over a CNN feature grid, an LSTM
decoder, the deep output layer and the doubly stochastic attention regulariser.

Read top to bottom: config, attention, decoder, captioner, loss. The model offers a step API for decoding::

    features = model.encode(images)              # (B, n_pixels, dim), once per image
    memory = model.prepare(features)             # encoder-side attention projection, once per image
    state = model.init_state(memory, n_beams)    # LSTM h, c: (B, n_beams, hidden)
    logprobs, state, alpha = model.step(tokens, state, memory)   # (B, n_beams, vocab), ..., (B, n_beams, n_pixels)

and a teacher-forced :meth:`Captioner.forward` for training.

Hard attention (the paper's section 4.1) trains differently and decodes the same. In training, each caption
either (with probability ``hard_sample_prob``, the paper's 0.5) reads, at every step, the feature vector of one
location s_t drawn from α_t, or reads the expectation Σ_i α_ti a_i as soft attention does. A sampled context does
not depend on α, so the attention learns from the REINFORCE term of :func:`hard_attention_loss`:
(log p(y | s, a) - b) ∇ Σ_t log α_t[s_t], with b a moving average of log p(y | s, a), plus an entropy bonus.
α is computed as a log-softmax, so log α_t[s_t] and the entropy stay finite however peaked α gets. Decoding and
the attention maps use the expectation for both kinds (the context the other half of hard training reads, and
deterministic, so beam search stays a search), so a hard-attention checkpoint decodes and draws maps exactly
like a soft one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.encoders import DEFAULT_ENCODER, ENCODERS, Encoder

ATTENTION_KINDS = ("soft", "hard")


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
    feature_dropout: float = 0.0  # training: drop each feature channel of a picture, in all its cells alike
    words_loss: float = 0.0  # λ of the bag-of-words loss; > 0: a "which words are here" head that starts the LSTM
    coverage: bool = False  # the attention also reads how much each cell was attended so far (See et al. 2017)
    deep_output: bool = True  # the paper's L_o(E y + L_h h + L_z z); False: a linear layer on h
    doubly_stochastic: float = 1.0  # λ of the attention regulariser λ mean_i (1 - Σ_t α_ti)²
    hard_sample_prob: float = 0.5  # hard attention: share of training captions that sample locations
    hard_reinforce: float = 1.0  # hard attention: λ_r, weight of the REINFORCE term
    hard_entropy: float = 0.01  # hard attention: λ_e, weight of the entropy bonus
    hard_baseline_decay: float = 0.9  # hard attention: b ← decay·b + (1 - decay)·mean log p(y | s, a)
    pad_id: int = 0
    start_id: int = 1
    end_id: int = 2

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODERS)}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
        if not 0.0 <= self.hard_sample_prob <= 1.0:
            raise ValueError(f"hard_sample_prob must be in [0, 1], got {self.hard_sample_prob}")
        if not 0.0 <= self.hard_baseline_decay < 1.0:
            raise ValueError(f"hard_baseline_decay must be in [0, 1), got {self.hard_baseline_decay}")
        if self.image_size is None:
            self.image_size = ENCODERS[self.encoder].image_size
        if self.vocab_size <= max(self.pad_id, self.start_id, self.end_id):
            raise ValueError(f"vocab_size {self.vocab_size} leaves no room for the special tokens")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), got {self.feature_dropout}")
        if self.words_loss < 0.0:
            raise ValueError(f"words_loss must be >= 0, got {self.words_loss}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CaptionerConfig:
        """Rebuild from a stored dict, ignoring keys a newer version may have added."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class SoftAttention(nn.Module):
    """Additive attention: e_i = w·tanh(W_a a_i + W_h h); α = softmax(e); context = Σ_i α_i a_i.

    With ``coverage``, e_i = w·tanh(W_a a_i + W_h h + w_c c_i), where c_i = Σ_{t'<t} α_t'i is how much cell i
    was attended before this step (See et al. 2017, "Get To The Point", eq. 11): the attention knows where it
    has looked and can move on to an object the caption has not named yet.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int, coverage: bool = False):
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim)  # W_a, applied once per image
        self.query = nn.Linear(hidden_dim, attention_dim)  # W_h
        self.score = nn.Linear(attention_dim, 1)  # w
        self.cover = nn.Linear(1, attention_dim, bias=False) if coverage else None  # w_c

    def energy(self, keys: Tensor, h: Tensor, coverage: Tensor | None) -> Tensor:
        """keys (B, L, A), h (B, K, H), coverage (B, K, L) or None → e (B, K, L)."""
        pre = keys.unsqueeze(1) + self.query(h).unsqueeze(2)  # (B, K, L, A)
        if self.cover is not None:
            if coverage is None:
                raise ValueError("a coverage attention needs the state's coverage")
            pre = pre + self.cover(coverage.unsqueeze(-1).to(pre.dtype))
        return self.score(torch.tanh(pre)).squeeze(-1)

    def log_alpha(self, keys: Tensor, h: Tensor, coverage: Tensor | None = None) -> Tensor:
        """keys (B, L, A), h (B, K, H) → log α (B, K, L), a log-softmax: finite however peaked α is."""
        return self.energy(keys, h, coverage).float().log_softmax(dim=-1)

    def forward(self, keys: Tensor, features: Tensor, h: Tensor,
                coverage: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """keys (B, L, A), features (B, L, D), h (B, K, H) → context (B, K, D), alpha (B, K, L)."""
        alpha = self.energy(keys, h, coverage).softmax(dim=-1)  # (B, K, L)
        return alpha @ features, alpha  # (B, K, D)

    @staticmethod
    def sample(log_alpha: Tensor) -> Tensor:
        """One location per row drawn from α: log_alpha (..., L) → indices (...). Gumbel-max, on the device."""
        uniform = torch.rand_like(log_alpha).clamp_(min=torch.finfo(log_alpha.dtype).tiny)
        return (log_alpha - (-uniform.log()).log()).argmax(dim=-1)


class HardSteps(NamedTuple):
    """What one hard-attention training step adds to the usual outputs, per image and beam."""

    location_logprob: Tensor  # (B, K) log α[s] of the sampled location; 0 where the expectation was read
    entropy: Tensor  # (B, K) entropy of α


class Memory(NamedTuple):
    """What the decoder reads at every step, computed once per image."""

    features: Tensor  # (B, L, D)
    keys: Tensor  # (B, L, A): the encoder-side attention projection


class State(NamedTuple):
    """LSTM state per image and beam, and for coverage models the attention so far."""

    h: Tensor  # (B, K, H)
    c: Tensor  # (B, K, H)
    coverage: Tensor | None = None  # (B, K, L) Σ of the earlier steps' α; None unless config.coverage

    def rows(self, n: int) -> State:
        """The state of the first n images."""
        return State(*(None if s is None else s[:n] for s in self))


class AttentionDecoder(nn.Module):
    """The LSTM that writes one word per step while attending over the feature grid."""

    def __init__(self, config: CaptionerConfig, feature_dim: int):
        super().__init__()
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.pad_id)
        # nn.Embedding starts at N(0, 1), which saturates the deep output's tanh(E y + ...) from the first step;
        # the reference code starts small (the PyTorch tutorial: U(-0.1, 0.1); arctic-captions: N(0, 0.01²)).
        with torch.no_grad():
            self.embedding.weight.uniform_(-0.1, 0.1)
            self.embedding.weight[c.pad_id].zero_()
        self.attention = SoftAttention(feature_dim, c.decoder_dim, c.attention_dim, c.coverage)
        self.init_h = nn.Linear(feature_dim, c.decoder_dim)  # h_0 = tanh(f_init,h(mean a))
        self.init_c = nn.Linear(feature_dim, c.decoder_dim)  # c_0 = tanh(f_init,c(mean a))
        self.f_beta = nn.Linear(c.decoder_dim, 1)  # gating scalar β = σ(f_β(h_{t-1}))
        # The bag-of-words head (words_loss > 0): p = σ(W_2 relu(W_1 mean a)), each vocabulary word's probability
        # of being in the caption, trained by its own loss (:func:`bag_of_words_loss`) and read by the initial
        # state, h_0 = tanh(f_init,h(mean a) + U_h p), as attribute-conditioned captioners (Yao et al. 2017,
        # LSTM-A) start the LSTM from the detected attributes.
        self.words = None
        if c.words_loss > 0:
            self.words = nn.Sequential(nn.Linear(feature_dim, c.decoder_dim), nn.ReLU(),
                                       nn.Linear(c.decoder_dim, c.vocab_size))
            self.init_words_h = nn.Linear(c.vocab_size, c.decoder_dim, bias=False)  # U_h
            self.init_words_c = nn.Linear(c.vocab_size, c.decoder_dim, bias=False)  # U_c
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

    def word_logits(self, features: Tensor) -> Tensor:
        """features (B, L, D) → the bag-of-words head's logits (B, V); only when the model has one."""
        return self.words(features.mean(dim=1))

    def init_state(self, memory: Memory, n_beams: int = 1) -> State:
        mean = memory.features.mean(dim=1)  # (B, D)
        h, c = self.init_h(mean), self.init_c(mean)  # (B, H)
        if self.words is not None:
            present = torch.sigmoid(self.words(mean))  # (B, V)
            h, c = h + self.init_words_h(present), c + self.init_words_c(present)
        h = torch.tanh(h).unsqueeze(1).expand(-1, n_beams, -1)  # (B, K, H)
        c = torch.tanh(c).unsqueeze(1).expand(-1, n_beams, -1)
        coverage = None
        if self.attention.cover is not None:
            B, L, _ = memory.features.shape
            coverage = memory.features.new_zeros(B, n_beams, L, dtype=torch.float32)
        return State(h.contiguous(), c.contiguous(), coverage)

    def step(self, tokens: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor]:
        """tokens (B, K) → logits (B, K, V), new state, alpha (B, K, L). Attention: the expectation."""
        context, alpha = self.attention(memory.keys, memory.features, state.h, state.coverage)  # (B,K,D), (B,K,L)
        return self._write(tokens, state, context, alpha)

    def hard_step(self, tokens: Tensor, state: State, memory: Memory,
                  sampled: Tensor) -> tuple[Tensor, State, Tensor, HardSteps]:
        """A hard-attention training step: rows where ``sampled`` (B,) is set read the feature vector of a
        location drawn from α, the others the expectation. tokens (B, K) → logits, state, alpha, HardSteps."""
        log_alpha = self.attention.log_alpha(memory.keys, state.h, state.coverage)  # (B, K, L)
        alpha = log_alpha.exp()
        location = self.attention.sample(log_alpha.detach())  # (B, K)
        features = memory.features
        picked = features.gather(1, location.unsqueeze(-1).expand(-1, -1, features.shape[-1]))  # (B, K, D)
        expected = alpha.to(features.dtype) @ features  # (B, K, D)
        use_sample = sampled.view(-1, 1, 1)
        context = torch.where(use_sample, picked, expected)
        location_logprob = log_alpha.gather(2, location.unsqueeze(-1)).squeeze(-1) * sampled.unsqueeze(1)
        entropy = -(alpha * log_alpha).sum(dim=-1)  # (B, K)
        logits, state, alpha = self._write(tokens, state, context, alpha)
        return logits, state, alpha, HardSteps(location_logprob, entropy)

    def _write(self, tokens: Tensor, state: State, context: Tensor, alpha: Tensor) -> tuple[Tensor, State, Tensor]:
        B, K = tokens.shape
        embedded = self.embedding(tokens)  # (B, K, E)
        context = torch.sigmoid(self.f_beta(state.h)) * context
        h, c = self.lstm(torch.cat([embedded, context], dim=-1).flatten(0, 1),
                         (state.h.flatten(0, 1), state.c.flatten(0, 1)))
        h, c = h.view(B, K, -1), c.view(B, K, -1)  # (B, K, H)
        if self.deep_output:
            hidden = torch.tanh(embedded + self.out_h(self.dropout(h)) + self.out_z(context))  # (B, K, E)
        else:
            hidden = h
        coverage = None if state.coverage is None else state.coverage + alpha.float()
        return self.out(self.dropout(hidden)), State(h, c, coverage), alpha


class TeacherForced(NamedTuple):
    """The outputs of :meth:`Captioner.forward`. The last three are None for soft attention."""

    logprobs: Tensor  # (B, T, V), zero at padded steps
    alphas: Tensor  # (B, T, L), zero at padded steps
    location_logprob: Tensor | None = None  # (B,) Σ_t log α_t[s_t] of the sampled locations (0: not sampled)
    entropy: Tensor | None = None  # (B,) Σ_t H(α_t)
    sampled: Tensor | None = None  # (B,) bool: the caption read sampled locations, not the expectation
    word_logits: Tensor | None = None  # (B, V) the bag-of-words head's logits (models with words_loss > 0)


class Captioner(nn.Module):
    """Encoder + attention decoder. Build with ``Captioner(CaptionerConfig(...))``."""

    def __init__(self, config: CaptionerConfig, pretrained_encoder: bool = False):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder, pretrained=pretrained_encoder, grid_size=config.grid_size,
                               fine_tune_blocks=config.fine_tune_blocks)
        self.decoder = AttentionDecoder(config, self.encoder.spec.dim)
        self.grid_shape = self.encoder.grid_shape(config.image_size, config.image_size)
        if config.attention == "hard":
            # The REINFORCE baseline: a moving average of log p(y | s, a), and how many batches it has seen;
            # both in the checkpoint so that a resumed run goes on with them.
            self.register_buffer("reward_baseline", torch.zeros(()))
            self.register_buffer("reward_baseline_updates", torch.zeros((), dtype=torch.long))

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
                sample_prob: float = 0.0) -> TeacherForced:
        """Teacher-forced pass over captions.

        features (B, L, D); tokens (B, T+1) = ``<start> w1 … wn <end> <pad>…``; lengths (B,) = number of
        targets (words + 1). Returns logprobs (B, T, V) and alphas (B, T, L), both zero at padded steps, and
        for hard attention in training mode the sampled locations' log-probabilities and the entropies.
        Captions are processed longest first and each step only runs the captions still going, so padding
        costs nothing and cannot change the result. ``sample_prob`` > 0 is scheduled sampling: each caption's
        input word is, with that probability, the model's own previous prediction instead of the reference.
        """
        B, L, _ = features.shape
        hard = self.config.attention == "hard" and self.training
        features = drop_channels(features, self.config.feature_dropout, self.training)
        T = tokens.shape[1] - 1
        sorted_lengths, order = lengths.sort(descending=True)
        n_active = (sorted_lengths.unsqueeze(0) > torch.arange(T, device=lengths.device).unsqueeze(1)).sum(1)
        n_active = n_active.tolist()  # one sync per batch, not per step
        memory = self.prepare(features[order])
        state = self.init_state(memory)
        tokens = tokens[order]
        logits = features.new_zeros(B, T, self.config.vocab_size)
        alphas = features.new_zeros(B, T, L)
        if hard:
            sampled = torch.rand(B, device=features.device) < self.config.hard_sample_prob
            location_logprobs = features.new_zeros(B, T, dtype=torch.float32)
            entropies = features.new_zeros(B, T, dtype=torch.float32)
        for t in range(T):
            n = n_active[t]
            if n == 0:
                break
            step_memory = Memory(memory.features[:n], memory.keys[:n])
            inputs = tokens[:n, t]
            if sample_prob > 0 and t > 0:
                own = torch.rand(n, device=inputs.device) < sample_prob
                inputs = torch.where(own, logits[:n, t - 1].argmax(dim=-1), inputs)
            step_state = state.rows(n)
            if hard:
                step_logits, new_state, alpha, extra = self.decoder.hard_step(
                    inputs.unsqueeze(1), step_state, step_memory, sampled[:n])
                location_logprobs[:n, t] = extra.location_logprob[:, 0]
                entropies[:n, t] = extra.entropy[:, 0]
            else:
                step_logits, new_state, alpha = self.decoder.step(inputs.unsqueeze(1), step_state, step_memory)
            logits[:n, t] = step_logits[:, 0]
            alphas[:n, t] = alpha[:, 0]
            state = new_state
        mask = (torch.arange(T, device=lengths.device).unsqueeze(0) < sorted_lengths.unsqueeze(1)).unsqueeze(-1)
        logprobs = logits.float().log_softmax(dim=-1) * mask
        unsort = order.argsort()
        words = None if self.decoder.words is None else self.decoder.word_logits(features)  # (B, V), input order
        if not hard:
            return TeacherForced(logprobs[unsort], alphas[unsort], word_logits=words)
        return TeacherForced(logprobs[unsort], alphas[unsort], location_logprobs.sum(1)[unsort],
                             entropies.sum(1)[unsort], sampled[unsort], words)


def drop_channels(features: Tensor, p: float, training: bool) -> Tensor:
    """Channel dropout of a feature grid: features (B, L, D) with each picture's channels dropped with probability
    ``p`` in all its cells alike (the rest scaled by 1 / (1 - p)); unchanged outside training or at p = 0. A
    decoder that cannot count on any one channel cannot learn a training drawing by the few channels that tell
    it apart, and has to read the object from many."""
    if not training or p == 0.0:
        return features
    return F.dropout1d(features.transpose(1, 2), p, training=True).transpose(1, 2)  # channels of (B, D, L)


def doubly_stochastic_penalties(alphas: Tensor) -> Tensor:
    """Per caption, the mean over grid cells of (1 - Σ_t α_ti)². alphas (B, T, L), zero at padded steps → (B,).

    The paper's eq. 14 adds λ Σ_i (1 - Σ_t α_ti)² to the NLL of a whole caption. We take the NLL per token
    (:func:`caption_loss`), so the penalty is normalised to match: averaged over the L cells, as the widely
    used PyTorch tutorial does (sgrvinod, ``alpha_c * ((1. - alphas.sum(dim=1)) ** 2).mean()`` beside a
    per-token cross-entropy) and as arctic-captions does over cells (``.sum(0).mean()``). λ = 1 then weighs the
    penalty like one token's NLL; summed over cells it was L times that (49 at 7×7) and forced attention to
    spread over at least L/C cells per step.
    """
    return ((1.0 - alphas.float().sum(dim=1)) ** 2).mean(dim=1)


def doubly_stochastic_penalty(alphas: Tensor) -> Tensor:
    """:func:`doubly_stochastic_penalties` averaged over the batch: the term λ multiplies. alphas (B, T, L)."""
    return doubly_stochastic_penalties(alphas).mean()


def caption_loss(logprobs: Tensor, alphas: Tensor, tokens: Tensor, lengths: Tensor,
                 doubly_stochastic: float) -> tuple[Tensor, Tensor]:
    """Mean token negative log-likelihood plus λ times the attention regulariser (mean over cells and captions).

    logprobs (B, T, V), alphas (B, T, L), tokens (B, T+1), lengths (B,). Returns (loss, nll).
    """
    targets = tokens[:, 1 : logprobs.shape[1] + 1]  # (B, T)
    mask = torch.arange(targets.shape[1], device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    token_logprobs = logprobs.gather(2, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    nll = -(token_logprobs * mask).sum() / mask.sum()
    return nll + doubly_stochastic * doubly_stochastic_penalty(alphas), nll


def bag_of_words_loss(word_logits: Tensor, tokens: Tensor, lengths: Tensor, end_id: int) -> Tensor:
    """Per caption, the multi-label cross-entropy of the bag-of-words head against the words the caption holds:
    Σ_v BCE(σ(logit_v), [v in caption]), summed over the vocabulary (the caller normalises over captions, as it
    does the attention penalty). word_logits (B, V); tokens (B, T+1) as given to :meth:`Captioner.forward`
    (``<start>`` first); lengths (B,) targets per caption, ``<end>`` included, which is not counted as a word.
    """
    words = tokens[:, 1:]  # (B, T)
    is_word = torch.arange(words.shape[1], device=lengths.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    present = word_logits.new_zeros(word_logits.shape, dtype=torch.float32)
    present.scatter_(1, torch.where(is_word, words, end_id), 1.0)
    present[:, end_id] = 0.0
    return F.binary_cross_entropy_with_logits(word_logits.float(), present, reduction="none").sum(dim=1)


def unlikelihood_loss(logprobs: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
    """Token-level unlikelihood (Welleck et al. 2020, "Neural Text Generation with Unlikelihood Training", eq. 4),
    summed over the caption tokens (the caller normalises, as it does the NLL): at every step t, for each word c
    the caption has already written (c in y_<t) that is not the target y_t,  -log(1 - p(c | y_<t, a)).

    A caption that never names one object twice then teaches the decoder to give its earlier words little
    probability where another word belongs, the repetition an attention captioner falls into when it does not
    recognise the second object ("a train below a train"). logprobs (B, T, V); tokens (B, T+1) with ``<start>``
    first; lengths (B,) targets per caption, ``<end>`` included.
    """
    targets = tokens[:, 1 : logprobs.shape[1] + 1]  # (B, T)
    valid = torch.arange(targets.shape[1], device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    written = torch.zeros(logprobs.shape, dtype=torch.int32, device=logprobs.device)
    written.scatter_(2, targets.unsqueeze(-1), valid.unsqueeze(-1).int())
    candidates = (written.cumsum(dim=1) - written) > 0  # c in y_<t
    candidates.scatter_(2, targets.unsqueeze(-1), False)  # ... and not y_t
    p = logprobs.float().exp().clamp(max=1.0 - 1e-6)
    return -(torch.log1p(-p) * (candidates & valid.unsqueeze(-1))).sum()


def coverage_loss(alphas: Tensor) -> Tensor:
    """The coverage loss of See et al. 2017 ("Get To The Point", eq. 12), summed over the caption tokens (the
    caller normalises, as it does the NLL): at every step, Σ_i min(α_ti, c_ti) with c_ti = Σ_{t'<t} α_t'i, the
    attention that falls again where earlier words already looked. alphas (B, T, L), zero at padded steps.

    It penalises reading one object for a second noun, the step where an attention captioner that does not
    recognise the other object names the first one again ("a train below a train").
    """
    alphas = alphas.float()
    coverage = alphas.cumsum(dim=1) - alphas
    return torch.minimum(alphas, coverage).sum()


def hard_attention_loss(model: Captioner, output: TeacherForced, tokens: Tensor,
                        update_baseline: bool = True) -> Tensor:
    """The hard-attention terms, summed over captions (the caller normalises, as it does the NLL):

        - λ_r Σ_n (R_n - b) Σ_t log α_t[s_t]  -  λ_e Σ_n Σ_t H(α_t),    R_n = log p(y_n | s_n, a)

    over the captions that sampled locations (the entropy over all). Its gradient is the paper's eq. 12
    estimator without the log-likelihood term the NLL already gives. b is the moving average of R before this
    batch, so the estimator stays unbiased; the first batch starts b at its own mean. ``output`` comes from
    :meth:`Captioner.forward` in training mode; tokens (B, T+1) as given to it.
    """
    if output.location_logprob is None or output.entropy is None or output.sampled is None:
        raise ValueError("hard_attention_loss needs the outputs of a hard-attention model in training mode")
    config = model.config
    T = output.logprobs.shape[1]
    targets = tokens[:, 1 : T + 1]
    reward = output.logprobs.detach().gather(2, targets.unsqueeze(-1)).squeeze(-1).sum(dim=1)  # (B,), 0 at pads
    sampled = output.sampled.float()
    baseline, n_updates = model.reward_baseline, model.reward_baseline_updates
    n_sampled = sampled.sum()
    batch_mean = (reward * sampled).sum() / n_sampled.clamp(min=1)
    used = torch.where(n_updates > 0, baseline, batch_mean)  # no sync with the host either way
    if update_baseline:
        decay = config.hard_baseline_decay
        baseline.copy_(torch.where(n_sampled > 0, decay * used + (1 - decay) * batch_mean, baseline))
        n_updates.add_((n_sampled > 0).long())
    advantage = (reward - used) * sampled  # (B,)
    return -(config.hard_reinforce * advantage * output.location_logprob).sum() \
        - config.hard_entropy * output.entropy.sum()
