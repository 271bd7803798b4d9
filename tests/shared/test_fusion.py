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


@pytest.mark.parametrize("kind", ["ease", "item-knn"])
def test_the_item_model_from_summed_counts_is_the_one_fit_on_the_logs(kind):
    from shared.data.pipeline import DataConfig, prepare_data
    from shared.evaluation.baselines import EASE, ItemKNN
    from shared.model.fusion import FusionConfig
    from shared.privacy.cooccurrence import cooccurrence_from_counts, counts_contribution
    split = prepare_data(DataConfig(dataset="synthetic:60x40", text_encoder="none", activity_features=False)).split
    total = sum(counts_contribution(u.train, split.n_items) for u in split.users)
    config = FusionConfig(kind=kind)
    federated = config.item_model(cooccurrence_from_counts(total, split.n_items))
    central = {"ease": EASE, "item-knn": ItemKNN}[kind](**config.item_settings).fit(split)
    histories = [u.train for u in split.users]
    assert np.allclose(federated(histories), central(histories))


def test_the_fusion_weight_is_chosen_with_the_encoder_from_before_its_refit():
    """Before session 9 the weight was chosen on validation with the refit encoder, which had
    trained on the validation items: validation NDCG@10 0.146 against 0.106 for the encoder that
    had not, and a weight that favoured the encoder."""
    import torch
    from shared.data.pipeline import DataConfig, prepare_data
    from shared.model.config import ModelHyper
    from shared.model.recommender import build_recommender
    from shared.model.training import TrainConfig, fit
    split = prepare_data(DataConfig(dataset="synthetic:80x40", text_encoder="none", activity_features=False)).split
    model = build_recommender(ModelHyper(dim=8, layers=1, heads=1, max_len=10), split.n_items, None)
    result = fit(model, split, TrainConfig(epochs=4, eval_every=2, refit_fraction=0.5, epoch_averaging=0.0))
    assert result.refit_epochs >= 1
    refit, selected = result.best_state, result.selected_state
    assert any(not torch.equal(refit[k], selected[k]) for k in refit)   # the refit moved the weights
    assert all(torch.equal(model.state_dict()[k], refit[k]) for k in refit)
