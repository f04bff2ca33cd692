import pytest

from satcli.data.text import detokenize, tokenize
from satcli.data.vocab import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary


@pytest.mark.parametrize("raw, tokens", [
    ("A dog, running on the beach!", ["a", "dog", "running", "on", "the", "beach"]),
    ("  Two  DOGS\tplay.  ", ["two", "dogs", "play"]),
    ("The dog's ball is red-and-white", ["the", "dog's", "ball", "is", "red", "and", "white"]),
    ("A man’s hat", ["a", "man's", "hat"]),
    ("3 kids; 2 cats...", ["3", "kids", "2", "cats"]),
    ("...", []),
])
def test_tokenize(raw, tokens):
    assert tokenize(raw) == tokens


def test_detokenize_round_trips_tokens():
    assert tokenize(detokenize(["a", "dog's", "ball"])) == ["a", "dog's", "ball"]


def test_vocabulary_build_is_deterministic_and_frequency_ordered():
    captions = [["a", "dog"], ["a", "cat"], ["a", "dog"], ["the", "bird"]]
    vocab = Vocabulary.build(captions, min_freq=2)
    assert vocab.words == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    assert Vocabulary.build(list(reversed(captions)), min_freq=1).words[4:] == ["a", "dog", "bird", "cat", "the"]


def test_encode_decode():
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "dog"])
    ids = vocab.encode(["a", "dog", "barks"])
    assert ids == [START_ID, 4, 5, UNK_ID, END_ID]
    assert vocab.encode(["a", "dog", "barks"], max_length=2) == [START_ID, 4, 5, END_ID]
    assert vocab.decode([*ids, PAD_ID, PAD_ID]) == ["a", "dog", "<unk>"]
    assert vocab.decode([4, END_ID, 5]) == ["a"]


def test_vocabulary_rejects_a_word_list_without_the_special_tokens():
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "dog"])
