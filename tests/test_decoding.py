import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from models.decoding import DecodingOptions, decode
from tests.helpers import random_features, tiny_captioner

PAD, START, END, A, B, C = range(6)


class BigramModel:
    """A fake step model: the next word's probability depends only on the previous word, through a fixed
    table per image. Its attention is one-hot on grid cell ``previous word``, so tests can check that the
    attention returned with each word is the one that produced it."""

    def __init__(self, table: dict[int, dict[int, float]], n_images: int = 1, vocab_size: int = 6):
        probs = torch.full((vocab_size, vocab_size), 0.0)
        for prev, nexts in table.items():
            for word, p in nexts.items():
                probs[prev, word] = p
        self.table = probs.log().expand(n_images, -1, -1).clone()  # (B, V, V)
        self.config = SimpleNamespace(pad_id=PAD, start_id=START, end_id=END)
        self.grid_shape = (2, 4)  # 8 cells ≥ vocab size
        self.n_steps = 0

    def encode(self, images):
        raise AssertionError("decode must not encode features")

    def prepare(self, features):
        return torch.arange(features.shape[0])

    def init_state(self, memory, n_beams=1):
        return (torch.zeros(len(memory), n_beams, 1),)

    def step(self, tokens, state, memory):
        self.n_steps += 1
        logprobs = self.table[memory.unsqueeze(1), tokens]  # (B, K, V)
        alpha = torch.nn.functional.one_hot(tokens, 8).float()  # (B, K, 8)
        return logprobs, state, alpha

    def features(self):
        return torch.zeros(self.table.shape[0], 8, 1)


# Greedy takes A (0.5) then C (0.45) then <end>: 0.225. The best caption is B <end>: 0.4 × 0.9 = 0.36.
TRAP = {
    START: {A: 0.5, B: 0.4, C: 0.1},
    A: {C: 0.45, B: 0.35, END: 0.2},
    B: {END: 0.9, C: 0.1},
    C: {END: 0.99, A: 0.01},
}


def brute_force_best(table, max_tokens):
    best, best_seq = -math.inf, None
    for n in range(max_tokens):
        for seq in itertools.product([A, B, C], repeat=n):
            path = [START, *seq, END]
            lp = sum(math.log(table[p].get(w, 0.0) or 1e-300) for p, w in itertools.pairwise(path))
            if lp > best:
                best, best_seq = lp, list(seq)
    return best_seq, best


def test_beam_search_finds_the_known_best_caption_that_greedy_misses():
    model = BigramModel(TRAP)
    greedy = decode(model, model.features(), beam_size=1)[0]
    beam = decode(model, model.features(), beam_size=2)[0]
    assert greedy.tokens == [A, C]
    assert greedy.sum_logprob == pytest.approx(math.log(0.5 * 0.45 * 0.99), abs=1e-5)
    best_seq, best_lp = brute_force_best(TRAP, 5)
    assert beam.tokens == best_seq == [B]
    assert beam.sum_logprob == pytest.approx(best_lp, abs=1e-5)
    assert beam.best.finished


@pytest.mark.parametrize("beam_size", [1, 3])
def test_each_word_carries_its_logprob_from_the_table(beam_size):
    model = BigramModel(TRAP)
    result = decode(model, model.features(), beam_size=beam_size, n_best=beam_size)[0]
    assert result.tokens == ([A, C] if beam_size == 1 else [B])
    for hyp in result.hypotheses:
        path = [START, *hyp.tokens]
        expected = [math.log(TRAP[p][w]) for p, w in itertools.pairwise(path)]
        assert hyp.token_logprobs == pytest.approx(expected, abs=1e-5)
        end = hyp.sum_logprob - sum(hyp.token_logprobs)
        assert end == pytest.approx(math.log(TRAP[path[-1]][END]), abs=1e-5)


def test_unfinished_captions_carry_every_words_logprob():
    table = {START: {A: 0.6, B: 0.4}, A: {A: 0.5, B: 0.5}, B: {A: 0.3, B: 0.7}}
    model = BigramModel(table)
    for hyp in decode(model, model.features(), beam_size=3, max_length=5, n_best=3)[0].hypotheses:
        expected = [math.log(table[p][w]) for p, w in itertools.pairwise([START, *hyp.tokens])]
        assert hyp.token_logprobs == pytest.approx(expected, abs=1e-5)
        assert sum(hyp.token_logprobs) == pytest.approx(hyp.sum_logprob, abs=1e-5)


def test_search_stops_once_no_live_beam_can_win():
    model = BigramModel(TRAP)
    decode(model, model.features(), beam_size=2, max_length=50)
    assert model.n_steps <= 8  # the best captions end within 3 steps; the loop checks every 4


def test_attention_returned_with_each_word_is_the_one_that_produced_it():
    model = BigramModel(TRAP)
    result = decode(model, model.features(), beam_size=3, n_best=3)[0]
    for hyp in result.hypotheses:
        previous = [START, *hyp.tokens[:-1]]
        assert hyp.attention.shape == (len(hyp.tokens), 2, 4)
        assert [int(a.flatten().argmax()) for a in hyp.attention] == previous


def test_n_best_are_distinct_and_ranked():
    model = BigramModel(TRAP)
    result = decode(model, model.features(), beam_size=3, n_best=3)[0]
    captions = [tuple(h.tokens) for h in result.hypotheses]
    assert len(set(captions)) == 3
    scores = [h.score for h in result.hypotheses]
    assert scores == sorted(scores, reverse=True)
    assert captions[0] == (B,)


def test_length_penalty_ranks_as_documented():
    # <end> straight away: log 0.4 = -0.916 (1 token). A B <end>: log(0.6·0.7·0.95) = -0.919 (3 tokens).
    table = {START: {END: 0.4, A: 0.6}, A: {B: 0.7, END: 0.3}, B: {END: 0.95, C: 0.05}, C: {END: 1.0}}
    model = BigramModel(table)
    by_sum = decode(model, model.features(), beam_size=3, length_penalty=0.0)[0]
    by_mean = decode(model, model.features(), beam_size=3, length_penalty=1.0)[0]
    assert by_sum.tokens == []
    assert by_sum.best.score == pytest.approx(math.log(0.4), abs=1e-5)
    assert by_mean.tokens == [A, B]
    assert by_mean.best.score == pytest.approx(math.log(0.6 * 0.7 * 0.95) / 3, abs=1e-5)


def test_a_search_where_nothing_ends_returns_max_length_captions():
    table = {START: {A: 0.6, B: 0.4}, A: {A: 0.5, B: 0.5}, B: {A: 0.3, B: 0.7}}
    model = BigramModel(table)
    result = decode(model, model.features(), beam_size=3, max_length=5, n_best=2)[0]
    for hyp in result.hypotheses:
        assert len(hyp.tokens) == 5
        assert not hyp.finished
        assert math.isfinite(hyp.sum_logprob)
        assert all(isinstance(t, int) for t in hyp.tokens)


def test_finished_caption_is_kept_while_longer_ones_continue():
    # B <end> finishes at step 2; the live beams go on through A... but never beat it.
    table = {START: {A: 0.55, B: 0.45}, A: {A: 0.6, C: 0.39, END: 0.01}, B: {END: 1.0},
             C: {C: 0.5, END: 0.5}}
    model = BigramModel(table)
    result = decode(model, model.features(), beam_size=2, max_length=8)[0]
    assert result.tokens == [B]
    assert result.sum_logprob == pytest.approx(math.log(0.45), abs=1e-5)


def test_batched_images_with_different_tables_equal_one_at_a_time():
    other = {START: {C: 0.7, A: 0.3}, C: {C: 0.2, END: 0.8}, A: {END: 1.0}}
    models = [BigramModel(TRAP), BigramModel(other)]
    batched = BigramModel(TRAP, n_images=2)
    batched.table[1] = models[1].table[0]
    together = decode(batched, batched.features(), beam_size=3, n_best=2)
    for i, alone_model in enumerate(models):
        alone = decode(alone_model, alone_model.features(), beam_size=3, n_best=2)[0]
        assert [h.tokens for h in alone.hypotheses] == [h.tokens for h in together[i].hypotheses]


# --- constraints: repeated n-grams, minimum length ---------------------------------------------------------------

# A model that wants to repeat itself: A B A B A B ... never ends on its own.
REPEATER = {START: {A: 0.9, C: 0.1}, A: {B: 0.8, C: 0.15, END: 0.05}, B: {A: 0.8, C: 0.15, END: 0.05},
            C: {END: 0.6, A: 0.4}}


def repeated_ngrams(tokens, n):
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_the_repeater_repeats_without_blocking():
    model = BigramModel(REPEATER)
    result = decode(model, model.features(), beam_size=1, max_length=12)[0]
    assert result.tokens == [A, B] * 6 and not result.best.finished


@pytest.mark.parametrize("beam_size", [1, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_ngram_blocking_never_emits_a_repeated_ngram(beam_size, n, length_penalty):
    model = BigramModel(REPEATER)
    result = decode(model, model.features(), beam_size=beam_size, max_length=12, n_best=beam_size,
                    no_repeat_ngram_size=n, length_penalty=length_penalty)[0]
    assert result.hypotheses
    for hyp in result.hypotheses:
        assert repeated_ngrams(hyp.tokens, n) == 0, hyp.tokens
        assert math.isfinite(hyp.sum_logprob)


def test_greedy_with_trigram_blocking_takes_the_best_word_that_does_not_repeat():
    model = BigramModel(REPEATER)
    result = decode(model, model.features(), beam_size=1, max_length=12, no_repeat_ngram_size=3)[0]
    # A B A B, then A would repeat "A B A": the next best word is C, then <end>.
    assert result.tokens == [A, B, A, B, C]
    assert result.sum_logprob == pytest.approx(math.log(0.9 * 0.8 * 0.8 * 0.8 * 0.15 * 0.6), abs=1e-5)


def test_ngram_blocking_on_the_real_model_batched_equals_alone():
    model = tiny_captioner(vocab_size=9).eval()  # 6 words: repeats are likely
    features = random_features(model, 4)
    options = DecodingOptions(beam_size=3, max_length=15, n_best=3, no_repeat_ngram_size=2)
    batched = decode(model, features, options)
    for i in range(4):
        alone = decode(model, features[i : i + 1], options)[0]
        assert [h.tokens for h in alone.hypotheses] == [h.tokens for h in batched[i].hypotheses]
        captions = [tuple(h.tokens) for h in batched[i].hypotheses]
        assert len(set(captions)) == len(captions)
        scores = [h.score for h in batched[i].hypotheses]
        assert scores == sorted(scores, reverse=True)
        for hyp in batched[i].hypotheses:
            assert repeated_ngrams(hyp.tokens, 2) == 0
            assert hyp.attention.shape[0] == len(hyp.tokens)


def test_min_length_holds_back_end():
    table = {START: {END: 0.9, A: 0.1}, A: {END: 0.9, A: 0.1}}
    model = BigramModel(table)
    assert decode(model, model.features(), beam_size=2)[0].tokens == []
    result = decode(model, model.features(), beam_size=2, n_best=2, min_length=3)[0]
    assert result.tokens == [A, A, A]
    assert result.best.finished
    assert result.sum_logprob == pytest.approx(math.log(0.1 ** 3 * 0.9), abs=1e-5)
    assert all(len(h.tokens) >= 3 for h in result.hypotheses)


def test_min_length_on_the_real_model():
    model = tiny_captioner().eval()
    for result in decode(model, random_features(model, 3), beam_size=3, n_best=3, max_length=12, min_length=6):
        assert all(len(h.tokens) >= 6 for h in result.hypotheses)


# --- the real captioner -----------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_reference(model, features, max_length):
    """Plain greedy decoding, one image, written the obvious way."""
    memory = model.prepare(features)
    state = model.init_state(memory)
    token, words, total = torch.tensor([[model.config.start_id]]), [], 0.0
    for _ in range(max_length):
        logprobs, state, _ = model.step(token, state, memory)
        logprobs[..., [model.config.start_id, model.config.pad_id]] = -math.inf
        word = int(logprobs[0, 0].argmax())
        total += float(logprobs[0, 0, word])
        if word == model.config.end_id:
            break
        words.append(word)
        token = torch.tensor([[word]])
    return words, total


def test_beam_size_1_equals_greedy_on_the_real_model():
    model = tiny_captioner().eval()
    features = random_features(model, 4)
    results = decode(model, features, beam_size=1, max_length=12)
    for i, result in enumerate(results):
        words, total = greedy_reference(model, features[i : i + 1], 12)
        assert result.tokens == words
        assert result.sum_logprob == pytest.approx(total, abs=1e-4)


def test_batched_beam_search_equals_each_image_alone():
    model = tiny_captioner(vocab_size=40).eval()
    features = random_features(model, 5)
    batched = decode(model, features, beam_size=4, max_length=15, n_best=2)
    for i in range(5):
        alone = decode(model, features[i : i + 1], beam_size=4, max_length=15, n_best=2)[0]
        assert [h.tokens for h in alone.hypotheses] == [h.tokens for h in batched[i].hypotheses]
        for a, b in zip(alone.hypotheses, batched[i].hypotheses, strict=True):
            assert a.sum_logprob == pytest.approx(b.sum_logprob, abs=1e-4)
            assert torch.allclose(a.attention, b.attention, atol=1e-5)
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
            assert len(b.token_logprobs) == len(b.tokens) and all(lp <= 0 for lp in b.token_logprobs)


def test_encoder_side_attention_projection_runs_once_per_image_not_per_step():
    model = tiny_captioner().eval()
    calls = []
    model.decoder.attention.key.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    results = decode(model, random_features(model, 3), beam_size=3, max_length=10)
    assert max(len(r.tokens) for r in results) > 1
    assert calls == [3]


def test_attention_grids_sum_to_one_on_the_real_model():
    model = tiny_captioner().eval()
    results = decode(model, random_features(model, 3), beam_size=3, max_length=10)
    for result in results:
        att = result.attention
        assert att.shape == (len(result.tokens), 7, 7)
        assert torch.allclose(att.sum(dim=(1, 2)), torch.ones(len(result.tokens)), atol=1e-5)


def test_decode_from_images_and_restores_training_mode():
    model = tiny_captioner(image_size=64)
    model.train()
    results = decode(model, torch.randn(2, 3, 64, 64), beam_size=2, max_length=6)
    assert len(results) == 2 and model.training
    assert results[0].attention.shape[1:] == (2, 2)


@pytest.mark.parametrize("bad, message", [
    (dict(beam_size=0), "beam_size"), (dict(max_length=0), "max_length"),
    (dict(n_best=4, beam_size=3), "n_best"), (dict(length_penalty=-1.0), "length_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(min_length=-1), "min_length"),
    (dict(min_length=5, max_length=5), "min_length"),
])
def test_options_are_validated_up_front(bad, message):
    with pytest.raises(ValueError, match=message):
        DecodingOptions(**bad)


# Greedy: A (0.6), then <end> (0.55): "A". A length penalty of 1 prefers a longer caption through A B (mean
# log-probability per token), which beam 1 must not go on to find: beam size 1 is greedy search.
LONGER = {START: {A: 0.6, B: 0.4}, A: {END: 0.55, B: 0.45}, B: {C: 1.0}, C: {END: 1.0}}


def greedy_by_hand(table, max_tokens):
    words, previous = [], START
    for _ in range(max_tokens):
        previous = max(table[previous], key=table[previous].get)
        if previous == END:
            break
        words.append(previous)
    return words


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0])
def test_beam_1_is_exactly_greedy_with_any_length_penalty(length_penalty):
    model = BigramModel(LONGER)
    result = decode(model, model.features(), beam_size=1, length_penalty=length_penalty)[0]
    assert result.tokens == greedy_by_hand(LONGER, 10) == [A]
    assert result.best.finished


def test_banned_words_are_never_written():
    model = BigramModel(TRAP)
    for beam_size in (1, 3):
        result = decode(model, model.features(), beam_size=beam_size, n_best=beam_size, banned_ids=(A,))[0]
        assert all(A not in h.tokens for h in result.hypotheses)
    assert decode(model, model.features(), beam_size=1, banned_ids=(A,))[0].tokens == [B]
