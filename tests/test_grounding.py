import numpy as np
import pytest

from satcli.scoring.grounding import GroundedObject, box_coverage, grounding_scores, objects_from_store

RED_CIRCLE = GroundedObject((0.0, 0.0, 0.5, 0.5), ("large", "red", "circle"))  # the top-left quarter
BLUE_SQUARE = GroundedObject((0.5, 0.5, 1.0, 1.0), ("small", "blue", "square"))  # the bottom-right quarter


def _peak(row: int, col: int) -> np.ndarray:
    grid = np.zeros((4, 4), np.float32)
    grid[row, col] = 1.0
    return grid


def test_attention_placed_by_hand_inside_and_outside_the_boxes():
    tokens = ["a", "red", "circle", "left", "of", "a", "blue", "square"]
    circle = np.full((4, 4), 0.7 / 12, np.float32)  # peak in the wrong box, 0.3 of the mass in the right one
    circle[:2, :2] = 0.3 / 4
    circle[3, 3] = 0.7 / 12 + 0.2
    circle /= circle.sum()
    inside_share = circle[:2, :2].sum()
    attention = np.stack([
        _peak(3, 0),  # "a": names nothing, not scored
        _peak(1, 1),  # "red": all attention on the red circle
        circle,  # "circle": looks mostly elsewhere
        _peak(0, 0), _peak(0, 0), _peak(0, 0),
        np.full((4, 4), 1 / 16, np.float32),  # "blue": uniform, its peak (the first cell) is outside
        _peak(2, 3),  # "square": inside the blue square
    ])
    scores = grounding_scores([(tokens, attention, [RED_CIRCLE, BLUE_SQUARE])])
    assert scores.n_words == 4
    assert scores.pointing == pytest.approx(2 / 4)
    assert scores.mass == pytest.approx((1.0 + inside_share + 0.25 + 1.0) / 4)
    assert scores.pointing_chance == pytest.approx(0.25) and scores.mass_chance == pytest.approx(0.25)


def test_a_word_naming_several_objects_is_scored_against_all_their_boxes():
    left = GroundedObject((0.0, 0.0, 0.25, 1.0), ("small", "red", "crosses"))
    right = GroundedObject((0.75, 0.0, 1.0, 1.0), ("small", "red", "crosses"))
    scores = grounding_scores([(["crosses"], _peak(2, 3)[None], [left, right])])
    assert (scores.n_words, scores.pointing, scores.mass) == (1, 1.0, 1.0)
    assert scores.pointing_chance == pytest.approx(0.5) and scores.mass_chance == pytest.approx(0.5)


def test_a_cell_partly_inside_a_box_counts_with_the_part_inside():
    thin = GroundedObject((0.0, 0.0, 0.125, 1.0), ("star",))  # half of the first column of a 4 × 4 grid
    np.testing.assert_allclose(box_coverage([thin.box], (4, 4))[:, 0], 0.5)
    scores = grounding_scores([(["star"], _peak(1, 0)[None], [thin])])
    assert scores.mass == pytest.approx(0.5) and scores.mass_chance == pytest.approx(0.125)


def test_no_objects_or_no_object_words_score_nothing():
    assert grounding_scores([(["a", "dog"], np.full((2, 4, 4), 1 / 16), [])]).n_words == 0
    assert grounding_scores([(["a", "green"], np.full((2, 4, 4), 1 / 16), [RED_CIRCLE])]).n_words == 0


def test_objects_from_store_rows():
    rows = [{"box": [0.1, 0.2, 0.3, 0.4], "label": "small red circle", "words": ["small", "red", "circle"]}]
    assert objects_from_store(rows) == [GroundedObject((0.1, 0.2, 0.3, 0.4), ("small", "red", "circle"))]
    assert objects_from_store(None) == []


def test_mean_peak_attention_per_word_against_uniform():
    # every generated word counts, object word or not; uniform attention peaks at 1/(H·W)
    half = np.zeros((4, 4), np.float32)
    half[0, 0] = half[3, 3] = 0.5
    attention = np.stack([_peak(0, 0), half, np.full((4, 4), 1 / 16, np.float32)])
    scores = grounding_scores([(["a", "red", "circle"], attention, [RED_CIRCLE]),
                               (["a"], _peak(1, 1)[None], [])])  # an image without objects counts too
    assert scores.n_peak_words == 4
    assert scores.peak == pytest.approx((1.0 + 0.5 + 1 / 16 + 1.0) / 4)
    assert scores.peak_uniform == pytest.approx(1 / 16)
