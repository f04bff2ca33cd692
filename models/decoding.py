"""Batched beam search over images × beams, on the model's device. Greedy search is beam size 1.

The search keeps, for every image, ``beam_size`` live hypotheses and a pool of the ``beam_size`` best finished
ones. Each step takes the best ``beam_size`` continuations of every image among all beams × vocabulary in one
``topk``; those that emit ``<end>`` go to the pool, ranked by the same length-penalised score that ranks the
final answer, so a caption that finishes early is kept and compared fairly with longer ones, and the live beams
are refilled with the best continuations that do not end (the search never narrows). Nothing in the
step loop leaves the device: the per-step history (token, parent beam, attention) is recorded as tensors and the
chosen captions are traced back once at the end. An image whose pool can no longer be beaten stops counting;
the loop ends when all images are settled or ``max_length`` tokens are written. A search in which no beam ever
emits ``<end>`` still returns its best ``max_length``-token captions, marked ``finished=False``.

Scores: ``score = sum_logprob / n_tokens ** length_penalty`` where ``n_tokens`` counts the words and the
``<end>`` token. ``length_penalty=0`` ranks by the plain sum of log-probabilities (favours short captions);
``length_penalty=1`` by the mean log-probability per token.

Beam size 1 is exactly greedy search, length penalty or not: the image settles at its first ``<end>``.

Constraints act on the log-probabilities before the ``topk``, so they shape the search rather than filter its
results. ``banned_ids``: words that are never written. ``min_length``: ``<end>`` is impossible until that many
words are written. ``no_repeat_ngram_size`` n: a word that would complete an n-gram the beam has already written
is impossible; every live beam's words so far are kept as one (images, beams, steps) tensor, and the banned
words of all beams come from one comparison of its trailing n-1 words with all its earlier windows and one
``scatter_add``. A hypothesis made impossible by the constraints (log-probability -inf) is never returned, so an
image may get fewer than ``n_best`` captions only when fewer possible ones exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor

# How often (in steps) the loop asks whether every image is settled: the only host-device sync in the loop.
_SETTLED_CHECK_EVERY = 4


@dataclass(frozen=True)
class DecodingOptions:
    """How to search for captions."""

    beam_size: int = 3
    max_length: int = 50  # most tokens written per caption, <end> included
    length_penalty: float = 0.0
    n_best: int = 1  # captions returned per image, best first (at most beam_size)
    no_repeat_ngram_size: int = 0  # n > 0: never write the same n words twice in one caption; 0: off
    min_length: int = 0  # fewest words before <end> may be written
    banned_ids: tuple[int, ...] = ()  # word ids never written (satcli bans <unk> unless told otherwise)

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        if not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n_best must be between 1 and beam_size ({self.beam_size}), got {self.n_best}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {self.length_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0: off), got {self.no_repeat_ngram_size}")
        if not 0 <= self.min_length < self.max_length:
            raise ValueError(f"min_length must be between 0 and max_length - 1 ({self.max_length - 1}): a caption "
                             f"of min_length words needs room for <end>; got {self.min_length}")
        if any(i < 0 for i in self.banned_ids):
            raise ValueError(f"banned_ids must be word ids (>= 0), got {self.banned_ids}")


@dataclass
class Hypothesis:
    """One caption: word ids (no ``<start>``/``<end>``), its log-probability and attention.

    ``token_logprobs[t]`` is the log-probability of ``tokens[t]`` given the words before it (after the search's
    constraints); a finished caption's ``<end>`` term is ``sum_logprob - sum(token_logprobs)``.
    """

    tokens: list[int]
    sum_logprob: float  # includes the log-probability of <end> when finished
    score: float  # the ranking score, see the module docstring
    attention: Tensor  # (n_tokens, grid_h, grid_w): the attention that produced each word
    finished: bool  # False when cut at max_length without <end>
    token_logprobs: list[float] = field(default_factory=list)  # one per token, see above


@dataclass
class DecodingResult:
    """The captions found for one image, best first."""

    hypotheses: list[Hypothesis] = field(default_factory=list)

    @property
    def best(self) -> Hypothesis:
        return self.hypotheses[0]

    @property
    def tokens(self) -> list[int]:
        return self.best.tokens

    @property
    def sum_logprob(self) -> float:
        return self.best.sum_logprob

    @property
    def attention(self) -> Tensor:
        return self.best.attention


class StepModel(Protocol):
    """What decoding needs from a model (the :class:`~models.captioner.Captioner` step API)."""

    config: Any  # has start_id, end_id, pad_id
    grid_shape: tuple[int, int]

    def encode(self, images: Tensor) -> Tensor: ...
    def prepare(self, features: Tensor) -> Any: ...
    def init_state(self, memory: Any, n_beams: int = 1) -> tuple[Tensor, ...]: ...
    def step(self, tokens: Tensor, state: Any, memory: Any) -> tuple[Tensor, Any, Tensor]: ...


def _length_score(sum_logprobs: Tensor, n_tokens: Tensor | int, penalty: float) -> Tensor:
    if penalty == 0:
        return sum_logprobs
    if isinstance(n_tokens, int):
        return sum_logprobs / max(n_tokens, 1) ** penalty
    return sum_logprobs / n_tokens.clamp(min=1).to(sum_logprobs.dtype) ** penalty


def _repeated_ngram_words(words: Tensor, n: int, vocab_size: int) -> Tensor:
    """(B, K, V) mask of the words that would repeat an n-gram already in ``words`` (B, K, t), per beam."""
    B, K, t = words.shape
    banned = torch.zeros(B, K, vocab_size, device=words.device)
    if t < n:
        return banned.bool()
    windows = words.unfold(2, n, 1)  # (B, K, t-n+1, n): every n-gram written so far
    prefix = words[:, :, t - n + 1:].unsqueeze(2)  # (B, K, 1, n-1): what the next word would extend
    seen = (windows[..., :-1] == prefix).all(dim=-1)  # (B, K, t-n+1); all() of nothing is True for n=1
    return banned.scatter_add_(2, windows[..., -1], seen.float()) > 0


def _reorder(state: tuple[Tensor, ...], flat_index: Tensor, n_images: int, n_beams: int) -> tuple[Tensor, ...]:
    """Pick, for every (image, beam), the state of the parent beam it continues."""
    reordered = [None if s is None else s.flatten(0, 1).index_select(0, flat_index).view(n_images, n_beams,
                                                                                        *s.shape[2:])
                 for s in state]
    return type(state)(*reordered) if hasattr(state, "_fields") else tuple(reordered)


@torch.inference_mode()
def decode(model: StepModel, images_or_features: Tensor, options: DecodingOptions | None = None,
           **overrides: Any) -> list[DecodingResult]:
    """Caption a batch. ``images_or_features`` is (B, 3, H, W) images or (B, n_pixels, dim) encoder features.

    Returns one :class:`DecodingResult` per image with ``options.n_best`` hypotheses, best first.
    Keyword overrides replace fields of ``options``: ``decode(model, x, beam_size=5)``.
    """
    options = replace(options or DecodingOptions(), **overrides)
    training = getattr(model, "training", False)
    if training:
        model.eval()  # type: ignore[attr-defined]
    try:
        features = model.encode(images_or_features) if images_or_features.dim() == 4 else images_or_features
        return _beam_search(model, features, options)
    finally:
        if training:
            model.train()  # type: ignore[attr-defined]


def _beam_search(model: StepModel, features: Tensor, options: DecodingOptions) -> list[DecodingResult]:
    config = model.config  # type: ignore[attr-defined]
    start_id, end_id, pad_id = config.start_id, config.end_id, config.pad_id
    B, K, T, alpha_pen = features.shape[0], options.beam_size, options.max_length, options.length_penalty
    device = features.device
    neg_inf = torch.tensor(float("-inf"), device=device)
    rows = torch.arange(B, device=device).unsqueeze(1)  # (B, 1)

    memory = model.prepare(features)
    state = model.init_state(memory, K)
    tokens = torch.full((B, K), start_id, dtype=torch.long, device=device)
    sum_logprobs = torch.zeros(B, K, device=device)
    sum_logprobs[:, 1:] = float("-inf")  # all beams start identical: let only the first one expand

    # Finished pool, best first: score, sum, the step that emitted <end>, the beam that emitted it.
    pool_score = torch.full((B, K), float("-inf"), device=device)
    pool_sum = torch.full((B, K), float("-inf"), device=device)
    pool_step = torch.zeros(B, K, dtype=torch.long, device=device)
    pool_beam = torch.zeros(B, K, dtype=torch.long, device=device)
    settled = torch.zeros(B, dtype=torch.bool, device=device)
    token_history: list[Tensor] = []  # per step (B, K): the word each live beam wrote
    parent_history: list[Tensor] = []  # per step (B, K): the beam it continued
    alpha_history: list[Tensor] = []  # per step (B, K, L): the attention that wrote that word
    sum_history: list[Tensor] = []  # per step (B, K): the beam's log-probability with that word
    n_gram = options.no_repeat_ngram_size
    written = torch.zeros(B, K, 0, dtype=torch.long, device=device)  # (B, K, t) live beams' words, if n_gram
    banned = torch.tensor(options.banned_ids, dtype=torch.long, device=device) if options.banned_ids else None

    for t in range(T):
        logprobs, new_state, alpha = model.step(tokens, state, memory)  # (B, K, V), ..., (B, K, L)
        V = logprobs.shape[-1]
        logprobs = logprobs.float()
        logprobs[..., start_id] = float("-inf")
        logprobs[..., pad_id] = float("-inf")
        if t < options.min_length:
            logprobs[..., end_id] = float("-inf")
        if banned is not None:
            logprobs[..., banned] = float("-inf")
        if n_gram:
            logprobs = logprobs.masked_fill(_repeated_ngram_words(written, n_gram, V), float("-inf"))
        candidates = sum_logprobs.unsqueeze(-1) + logprobs  # (B, K, V)

        # The best K continuations of each image. Those that emit <end> (t words + <end>) are finished: they
        # join the pool, ranked by their final score. Only a continuation that makes this top K may finish,
        # so beam size 1 is exactly greedy search.
        top_sum, top_flat = candidates.flatten(1).topk(K, dim=1)  # (B, K)
        top_parent = torch.div(top_flat, V, rounding_mode="floor")
        ends = (top_flat - top_parent * V == end_id) & ~settled.unsqueeze(1)
        end_score = torch.where(ends, _length_score(top_sum, t + 1, alpha_pen), neg_inf)
        pool_score, pick = torch.cat([pool_score, end_score], dim=1).topk(K, dim=1)
        pool_sum = torch.cat([pool_sum, top_sum], dim=1).gather(1, pick)
        pool_step = torch.cat([pool_step, torch.full_like(pool_step, t)], dim=1).gather(1, pick)
        pool_beam = torch.cat([pool_beam, top_parent], dim=1).gather(1, pick)

        # Live beams: the best K continuations that do not end.
        candidates[..., end_id] = float("-inf")
        sum_logprobs, flat = candidates.flatten(1).topk(K, dim=1)  # (B, K)
        parent = torch.div(flat, V, rounding_mode="floor")
        tokens = flat - parent * V
        state = _reorder(new_state, (rows * K + parent).flatten(), B, K)
        if n_gram:
            written = torch.cat([written.gather(1, parent.unsqueeze(-1).expand(-1, -1, t)),
                                 tokens.unsqueeze(-1)], dim=2)
        token_history.append(tokens)
        parent_history.append(parent)
        sum_history.append(sum_logprobs)
        alpha_history.append(alpha.gather(1, parent.unsqueeze(-1).expand(-1, -1, alpha.shape[-1])))

        # Settled: the pool is full and no live beam can reach its worst score, even at the longest length.
        # Beam size 1 is greedy search: its first <end> settles it, whatever a length penalty would say later.
        best_possible = _length_score(sum_logprobs.max(dim=1).values, T, alpha_pen)
        full = pool_score[:, -1] > float("-inf")
        settled = settled | (full if K == 1 else full & (best_possible <= pool_score[:, -1]))
        if (t + 1) % _SETTLED_CHECK_EVERY == 0 and bool(settled.all()):
            break

    n_steps = len(token_history)
    # Candidates for the answer: the finished pool, then the live beams as unfinished captions (these only
    # fill places the pool left empty: a caption that never ended ranks below every caption that did).
    live_score = _length_score(sum_logprobs, n_steps, alpha_pen)
    all_score = torch.cat([pool_score, live_score], dim=1)  # (B, 2K)
    finished = torch.cat([pool_score > float("-inf"), torch.zeros_like(pool_score, dtype=torch.bool)], dim=1)
    order = all_score.argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, finished.gather(1, order).int().argsort(dim=1, descending=True, stable=True))
    chosen = order[:, : options.n_best]  # (B, N)

    last_step = torch.cat([pool_step - 1, torch.full_like(pool_step, n_steps - 1)], dim=1).gather(1, chosen)
    beam = torch.cat([pool_beam, torch.arange(K, device=device).expand(B, K)], dim=1).gather(1, chosen)
    chosen_sum = torch.cat([pool_sum, sum_logprobs], dim=1).gather(1, chosen)
    chosen_score = all_score.gather(1, chosen)
    chosen_finished = finished.gather(1, chosen)
    # An impossible hypothesis (every continuation banned, or a beam that never held a caption) is dropped;
    # the best one always stays so that every image has an answer.
    possible = chosen_sum > float("-inf")
    possible[:, 0] = True

    # Trace every chosen caption back through the recorded steps (a loop over steps, not images).
    N, L = chosen.shape[1], alpha_history[0].shape[-1]
    words = torch.full((B, N, n_steps), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros(B, N, n_steps, L, device=device)
    running = torch.zeros(B, N, n_steps + 1, device=device)  # [:, :, t + 1]: the path's sum after word t
    pointer = torch.zeros_like(beam)
    for t in reversed(range(n_steps)):
        pointer = torch.where(last_step == t, beam, pointer)
        valid = last_step >= t  # (B, N)
        words[:, :, t] = torch.where(valid, token_history[t].gather(1, pointer), pad_id)
        step_alpha = alpha_history[t].gather(1, pointer.unsqueeze(-1).expand(-1, -1, L))
        attention[:, :, t] = step_alpha * valid.unsqueeze(-1)
        running[:, :, t + 1] = torch.where(valid, sum_history[t].gather(1, pointer), 0.0)
        pointer = parent_history[t].gather(1, pointer)
    token_logprobs = running[:, :, 1:] - running[:, :, :-1]  # (B, N, n_steps); past a caption's end: unused

    return _to_results(words, attention, token_logprobs, last_step + 1, chosen_sum, chosen_score, chosen_finished,
                       possible, model.grid_shape)


def _to_results(words: Tensor, attention: Tensor, token_logprobs: Tensor, n_words: Tensor, sums: Tensor,
                scores: Tensor, finished: Tensor, possible: Tensor,
                grid_shape: tuple[int, int]) -> list[DecodingResult]:
    """Move the chosen captions to the host once and split them per image."""
    words_list, n_list = words.cpu().tolist(), n_words.cpu().tolist()
    # One transfer for every float per hypothesis: sum, score, then the per-word log-probabilities.
    floats = torch.cat([sums.unsqueeze(-1), scores.unsqueeze(-1), token_logprobs], dim=2).cpu().tolist()
    finished_list = finished.cpu().tolist()
    possible_list = possible.cpu().tolist()
    attention = attention.float().cpu()
    results = []
    for b in range(words.shape[0]):
        hypotheses = []
        for n in range(words.shape[1]):
            if not possible_list[b][n]:
                continue
            length = n_list[b][n]
            hypotheses.append(Hypothesis(
                tokens=words_list[b][n][:length],
                sum_logprob=floats[b][n][0],
                score=floats[b][n][1],
                attention=attention[b, n, :length].reshape(length, *grid_shape),
                finished=finished_list[b][n],
                token_logprobs=floats[b][n][2 : 2 + length],
            ))
        results.append(DecodingResult(hypotheses))
    return results


@dataclass
class Samples:
    """Captions drawn from the model, ``n_samples`` per image, with the graph kept (for self-critical training)."""

    tokens: Tensor  # (B, n_samples, T) word ids, <end> included when written, then pad
    logprobs: Tensor  # (B, n_samples, T) log-probability of each written token (<end> included), 0 after it
    finished: Tensor  # (B, n_samples) bool: wrote <end> within max_length


def sample(model: StepModel, features: Tensor, n_samples: int, max_length: int,
           banned_ids: tuple[int, ...] = ()) -> Samples:
    """Draw ``n_samples`` captions per image from the model's own distribution; features (B, L, D).

    Unlike :func:`decode` this keeps the autograd graph (the log-probabilities are what a policy gradient
    differentiates) and runs in whatever mode the model is in. ``<start>``, ``<pad>`` and ``banned_ids`` (as in
    :class:`DecodingOptions`) are never drawn.
    Sampling is a Gumbel-max over the log-probabilities, on the device; the loop stops once every caption
    has written ``<end>`` (checked every few steps) or after ``max_length`` tokens.
    """
    if n_samples < 1 or max_length < 1:
        raise ValueError(f"n_samples and max_length must be at least 1, got {n_samples} and {max_length}")
    config = model.config  # type: ignore[attr-defined]
    start_id, end_id, pad_id = config.start_id, config.end_id, config.pad_id
    B, device = features.shape[0], features.device
    memory = model.prepare(features)
    state = model.init_state(memory, n_samples)
    tokens = torch.full((B, n_samples), start_id, dtype=torch.long, device=device)
    done = torch.zeros(B, n_samples, dtype=torch.bool, device=device)
    words: list[Tensor] = []
    logprobs: list[Tensor] = []
    for t in range(max_length):
        step_logprobs, state, _ = model.step(tokens, state, memory)  # (B, n, V)
        step_logprobs = step_logprobs.float()
        allowed = step_logprobs.detach().clone()
        allowed[..., start_id] = float("-inf")
        allowed[..., pad_id] = float("-inf")
        if banned_ids:
            allowed[..., list(banned_ids)] = float("-inf")
        uniform = torch.rand_like(allowed).clamp_(min=torch.finfo(allowed.dtype).tiny)
        word = (allowed - (-uniform.log()).log()).argmax(dim=-1)  # (B, n)
        word_logprob = step_logprobs.gather(2, word.unsqueeze(-1)).squeeze(-1)
        words.append(torch.where(done, pad_id, word))
        logprobs.append(torch.where(done, torch.zeros_like(word_logprob), word_logprob))
        done = done | (word == end_id)
        tokens = words[-1]
        if (t + 1) % _SETTLED_CHECK_EVERY == 0 and bool(done.all()):
            break
    return Samples(torch.stack(words, dim=2), torch.stack(logprobs, dim=2), done)
