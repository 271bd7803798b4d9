"""Fusing the encoder's scores with an item-item model's (shared/model/fusion.py)."""
import numpy as np
import pytest

from shared.model.fusion import ITEM_ONLY, FusedScorer, choose_weight, standardised


def fixed(table: np.ndarray):
    """A scorer that gives every history the same row of scores."""
    return lambda histories: np.tile(table, (len(histories), 1))


def test_standardised_rows_have_mean_0_sd_1_and_keep_padding_out():
    out = standardised(np.array([[5.0, 1.0, 2.0, 3.0], [0.0, 10.0, 10.0, 40.0]]))
    assert np.isneginf(out[:, 0]).all()
    assert out[:, 1:].mean(axis=1) == pytest.approx([0, 0]) and out[:, 1:].std(axis=1) == pytest.approx([1, 1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        standardised(np.array([[0.0, np.nan, 1.0]]))


def test_the_weight_is_chosen_by_what_ranks_the_targets_best():
    # The encoder likes item 1, the item model likes item 2; the targets are item 2: the item model should weigh most.
    encoder, items = fixed(np.array([0, 3.0, 1.0, 0.0, 0.5])), fixed(np.array([0, 0.0, 3.0, 1.0, 0.5]))
    histories = [np.array([4])] * 6
    weight, table = choose_weight(encoder, items, histories, np.array([2] * 6))
    assert weight >= 1 and table[weight] == pytest.approx(1.0) and table[ITEM_ONLY] == pytest.approx(1.0)
    assert table[0.0] < 1.0
    # ... and the encoder alone when its item is the target (ties: the smaller weight).
    weight, _ = choose_weight(encoder, items, histories, np.array([1] * 6))
    assert weight == 0.0


def test_weight_zero_is_the_encoder_alone():
    encoder, items = fixed(np.array([0, 3.0, 1.0])), fixed(np.array([0, 0.0, 9.0]))
    assert np.array_equal(FusedScorer(encoder, items, 0.0)([np.array([1])]), encoder([np.array([1])]))
    fused = FusedScorer(encoder, items, 1.0)([np.array([1])])[0]
    assert fused[1] == pytest.approx(1.0 - 1.0) and fused[2] == pytest.approx(-1.0 + 1.0)
