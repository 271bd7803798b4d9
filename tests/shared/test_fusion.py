"""Fusing the encoder's scores with an item-item model's (shared/model/fusion.py)."""
import numpy as np
import pytest

from fedrec.shared.model.fusion import (BLEND_KINDS, BLEND_RULES, ENCODER_ALONE, ITEM_ONLY, Blend, FusedScorer, FusionConfig, blend_ndcg,
                                 blend_statistics, blends, choose_from_statistics, choose_weight, device_blend_ndcg,
                                 standardised)


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
    # Weights >= 1 and the item model alone all rank every target first: the alone is not ahead, so the
    # least of those weights with the encoder.
    assert weight == 1.0 and table[1.0] == pytest.approx(1.0) and table[ITEM_ONLY] == pytest.approx(1.0)
    assert table[0.0] < 1.0
    # ... and the encoder alone when its item is the target (ties: the smaller weight).
    weight, _ = choose_weight(encoder, items, histories, np.array([1] * 6))
    assert weight == 0.0


def test_weight_zero_is_the_encoder_alone():
    encoder, items = fixed(np.array([0, 3.0, 1.0])), fixed(np.array([0, 0.0, 9.0]))
    assert np.array_equal(FusedScorer(encoder, {"x": items}, Blend.of("x", 0.0))([np.array([1])]),
                          encoder([np.array([1])]))
    fused = FusedScorer(encoder, {"x": items}, Blend.of("x", 1.0))([np.array([1])])[0]
    assert fused[1] == pytest.approx(1.0 - 1.0) and fused[2] == pytest.approx(-1.0 + 1.0)


@pytest.mark.parametrize("kind", BLEND_KINDS)
def test_the_item_model_from_summed_counts_is_the_one_fit_on_the_logs(kind):
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    from fedrec.shared.evaluation.baselines import EASE, ItemKNN, MostPopular
    from fedrec.shared.privacy.cooccurrence import cooccurrence_from_counts, counts_contribution
    split = prepare_data(DataConfig(dataset="synthetic:60x40", text_encoder="none", activity_features=False)).split
    total = sum(counts_contribution(u.train, split.n_items) for u in split.users)
    config = FusionConfig(kind=kind)
    federated = config.item_model(kind, cooccurrence_from_counts(total, split.n_items))
    central = {"ease": EASE, "item-knn": ItemKNN, "popular": MostPopular}[kind](**config.settings(kind)).fit(split)
    histories = [u.train for u in split.users]
    assert np.allclose(federated(histories), central(histories))


def test_the_fusion_weight_is_chosen_with_the_encoder_from_before_its_refit():
    """Before session 9 the weight was chosen on validation with the refit encoder, which had
    trained on the validation items: validation NDCG@10 0.146 against 0.106 for the encoder that
    had not, and a weight that favoured the encoder."""
    import torch
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    from fedrec.shared.model.config import ModelHyper
    from fedrec.shared.model.recommender import build_recommender
    from fedrec.shared.model.training import TrainConfig, fit
    split = prepare_data(DataConfig(dataset="synthetic:80x40", text_encoder="none", activity_features=False)).split
    model = build_recommender(ModelHyper(dim=8, layers=1, heads=1, max_len=10), split.n_items, None)
    result = fit(model, split, TrainConfig(epochs=4, eval_every=2, refit_fraction=0.5, epoch_averaging=0.0))
    assert result.refit_epochs >= 1
    refit, selected = result.best_state, result.selected_state
    assert any(not torch.equal(refit[k], selected[k]) for k in refit)   # the refit moved the weights
    assert all(torch.equal(model.state_dict()[k], refit[k]) for k in refit)


def test_blends_put_the_encoder_alone_first_and_ties_go_to_the_earlier():
    candidates = blends(("ease", "popular"), weights=(1.0, 0.5))
    assert candidates[0] == ENCODER_ALONE
    assert [c.weight for c in candidates[1:4]] == [0.5, 1.0, ITEM_ONLY] and candidates[3].label == "ease alone"
    same = np.tile([0.2, 0.3, 0.3, 0.1, 0, 0, 0], (10, 1))        # every user alike: no noise, a tie
    assert choose_from_statistics(candidates, blend_statistics(same), 10)[0] == Blend.of("ease", 0.5)
    assert FusedScorer(fixed(np.array([0, 3.0, 1.0])), {"ease": fixed(np.array([0, 0.0, 9.0]))},
                       Blend.of("ease", ITEM_ONLY))([np.array([1])])[0][2] == 9.0   # the item model alone
    assert len(blends(("ease", "item-knn"))) == 1 + 2 * 7 + 16      # and the pairs
    three = blends(("ease", "item-knn"))[-1]
    assert three.label == "encoder + 4 x ease + 4 x item-knn" and Blend.from_dict(three.to_dict()) == three


def test_the_safeguard_picks_an_item_model_alone_when_the_encoder_only_adds_noise():
    """A sparse log's failure (issue 21): an encoder that ranks the targets last and popularity that
    ranks them first. The blend chosen on validation is popularity alone, never below it."""
    rng = np.random.default_rng(0)
    encoder = lambda h: np.hstack([np.zeros((len(h), 1)), rng.normal(size=(len(h), 8))])   # noise
    popular = fixed(np.array([0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]))
    histories, targets = [np.array([8])] * 20, np.array([1] * 20)
    candidates = blends(("popular",))
    per_user = blend_ndcg(encoder, {"popular": popular}, candidates, histories, targets)
    chosen, report = choose_from_statistics(candidates, blend_statistics(per_user), 20)
    assert chosen.label == "popular alone" and report["valid_ndcg@10"]["popular alone"] == pytest.approx(1.0)


def test_the_one_se_rule_takes_the_simpler_blend_unless_the_better_one_is_clearly_better():
    """The best of many candidates on a few hundred users is partly luck: a blend ahead of an item
    model alone by less than one paired standard error loses to it; one far ahead wins."""
    rng = np.random.default_rng(0)
    candidates = [Blend.of("ease", ITEM_ONLY), Blend.of("ease", 1.0)]
    alone = rng.random(400)
    noisy = alone + rng.normal(0, 0.2, 400) + 0.005       # ahead by 0.005, SE about 0.01
    chosen, report = choose_from_statistics(candidates, blend_statistics(np.c_[alone, noisy]), 400,
                                            rule="simplest-within-se")
    assert report["best_on_validation"] == "encoder + 1 x ease" and chosen.label == "ease alone"
    clear = alone + 0.05 + rng.normal(0, 0.02, 400)          # ahead by 0.05, SE about 0.001
    assert choose_from_statistics(candidates, blend_statistics(np.c_[alone, clear]), 400,
                                  rule="simplest-within-se")[0].label == "encoder + 1 x ease"
    # The statistics are sums: two halves summed choose as the whole does.
    halves = blend_statistics(np.c_[alone, noisy][:150]) + blend_statistics(np.c_[alone, noisy][150:])
    assert np.allclose(halves, blend_statistics(np.c_[alone, noisy]))


def test_a_device_judges_item_models_that_never_counted_its_validation_item():
    """The counts were summed over each device's training and validation items; a device scoring its
    validation item must take its own part back out, or the item models would find the item through
    its own history (a leak that makes the item models look better than they are). Items 5 and 6 are
    seen only by this device, together: counted, item-kNN ranks 5 first after 6; taken out, it cannot."""
    from fedrec.shared.evaluation.metrics import exclude_seen, ndcg, target_ranks
    from fedrec.shared.privacy.cooccurrence import cooccurrence_from_counts, counts_contribution, without_own_validation
    n_items = 6
    others = [np.array([1, 2, 3]), np.array([1, 2, 4]), np.array([2, 3, 4])] * 3
    train, valid = np.array([6]), 5
    counts = sum(counts_contribution(h, n_items) for h in others) + counts_contribution(np.append(train, valid), n_items)
    encoder = fixed(np.zeros(n_items + 1))
    fusion = FusionConfig(neighbours=3, shrink=0.0, decay=1.0)
    own = without_own_validation(counts, train, valid, n_items)
    values = device_blend_ndcg(encoder, own, train, valid, ("item-knn",), fusion)
    knn_alone = [i for i, c in enumerate(blends(("item-knn",))) if c.label == "item-knn alone"][0]
    assert values[knn_alone] < 0.7           # item 5 ties with every unseen item: ranks 1-5
    leaked = fusion.item_model("item-knn", cooccurrence_from_counts(counts, n_items))
    assert ndcg(target_ranks(exclude_seen(leaked([train]), [train]), np.array([valid])), 10)[0] == pytest.approx(1.0)


def test_a_blend_request_outside_what_a_device_accepts_is_malformed():
    from flwr.app import RecordDict

    from fedrec.shared.protocol import MalformedRecord, pack_blend_request, unpack_blend_request
    good = FusionConfig().wire_settings()
    counts = np.zeros(10)
    assert unpack_blend_request(RecordDict(pack_blend_request(counts, ("ease",), good)), 10, BLEND_KINDS)[1] == ("ease",)
    for what, request in {"size": pack_blend_request(np.zeros(9), ("ease",), good),
                          "fractional counts": pack_blend_request(counts + 0.5, ("ease",), good),
                          "unknown kind": pack_blend_request(counts, ("svd",), good),
                          "huge neighbours": pack_blend_request(counts, ("item-knn",), {**good, "neighbours": 1e9}),
                          "decay > 1": pack_blend_request(counts, ("ease",), {**good, "decay": 2.0})}.items():
        with pytest.raises(MalformedRecord):
            unpack_blend_request(RecordDict(request), 10, BLEND_KINDS)


def test_among_equally_simple_blends_within_noise_the_rule_leans_on_the_encoder():
    """The encoder judged on validation is the one from before its refit, weaker than the one that
    ranks for test (ML-100K: 0.25 x EASE is best on test where validation prefers 0.5 or 1)."""
    rng = np.random.default_rng(1)
    base = rng.random(400)
    candidates = [Blend.of("ease", 0.25), Blend.of("ease", 1.0)]
    noise = rng.normal(0, 0.1, 400)
    per_user = np.c_[base, base + noise - noise.mean() + 0.002]   # 1.0 ahead by 0.002, its SE about 0.005
    chosen, report = choose_from_statistics(candidates, blend_statistics(per_user), 400, rule="simplest-within-se")
    assert report["best_on_validation"] == "encoder + 1 x ease" and chosen.label == "encoder + 0.25 x ease"


def test_the_shipped_rule_keeps_a_trained_encoder_that_an_item_model_alone_only_matches_within_noise():
    """Session 15's second 500-round run: "ease alone" within one paired SE of the best blend (0.1319
    against 0.1363, SE 0.0086 on 200 devices) was taken by the one-SE rule and dropped an encoder that
    scored 0.0934 alone on test; the run lost 12%. On ML-100K's held-out validation users that rule is
    2-5% below taking the best blend with the encoder (`fedrec bench blend-rule`)."""
    rng = np.random.default_rng(3)
    alone = rng.random(200) * 0.26
    noise = rng.normal(0, 0.12, 200)
    blend = alone + noise - noise.mean() + 0.0044                      # ahead by 0.0044, paired SE about 0.0085
    candidates = [ENCODER_ALONE, Blend.of("ease", 1.0), Blend.of("ease", ITEM_ONLY)]
    per_user = np.c_[alone * 0.5, blend, alone]
    statistics = blend_statistics(per_user)
    old, _ = choose_from_statistics(candidates, statistics, 200, rule="simplest-within-se")
    chosen, report = choose_from_statistics(candidates, statistics, 200)
    assert old.label == "ease alone" and chosen.label == "encoder + 1 x ease", report["why"]
    assert report["rule"] == "encoder-unless-beaten"


def test_the_shipped_rule_takes_an_item_model_alone_when_it_is_clearly_ahead():
    rng = np.random.default_rng(4)
    alone = (rng.random(400) < 0.3).astype(float)
    blend = alone * (rng.random(400) < 0.7)                            # misses 30% of what the alone hits
    candidates = [ENCODER_ALONE, Blend.of("item-knn", 1.0), Blend.of("item-knn", ITEM_ONLY)]
    chosen, report = choose_from_statistics(candidates, blend_statistics(np.c_[blend * 0.5, blend, alone]), 400)
    assert chosen.label == "item-knn alone", report["why"]


@pytest.mark.parametrize("rule", sorted(BLEND_RULES))
def test_every_rule_takes_a_candidate_that_is_best_for_every_user(rule):
    candidates = blends(("ease", "item-knn"))
    rng = np.random.default_rng(5)
    per_user = rng.random((50, len(candidates))) * 0.5
    per_user[:, 7] = 1.0
    chosen, _ = choose_from_statistics(candidates, blend_statistics(per_user), 50, rule=rule)
    assert chosen == candidates[7]
