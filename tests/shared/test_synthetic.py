from fedrec.shared.data.preprocess import prepare
from fedrec.shared.data.synthetic import generate


def test_shape_validity_and_determinism():
    a, b = generate(300, 500, seed=3), generate(300, 500, seed=3)
    assert a.interactions.frame.equals(b.interactions.frame)
    assert a.interactions.n_users == 300 and len(a.catalog) == 500
    assert a.interactions.frame["item"].isin(a.catalog.frame.index).all()
    encoded, split = prepare(a.interactions, a.catalog)
    assert len(split) == 300                           # every user has >= 3 distinct events


def test_popularity_is_heavy_tailed_and_users_stick_to_few_topics():
    ds = generate(2000, 3000, n_topics=20, interests_per_user=3, seed=1)
    counts = ds.interactions.frame["item"].value_counts().to_numpy()
    top_share = counts[: len(counts) // 100].sum() / counts.sum()
    assert top_share > 0.1                              # top 1% of items: >10% of events
    topic = {i: g[0] for i, g in zip(ds.catalog.frame["item"], ds.catalog.frame["genres"])}
    per_user = ds.interactions.frame.assign(t=ds.interactions.frame["item"].map(topic)).groupby("user")["t"].nunique()
    assert per_user.max() <= 3


def test_interest_drift_moves_the_topic_mix():
    ds = generate(2000, 1000, n_topics=10, drift=1.0, mean_events=40, seed=2)
    f = ds.interactions.frame
    topic = dict(zip(ds.catalog.frame["item"], ds.catalog.frame["genres"]))
    f = f.assign(t=f["item"].map(topic).str[0], half=f.groupby("user").cumcount() >= f.groupby("user")["item"].transform("size") / 2)
    changed = (f.groupby(["user", "half"])["t"].agg(lambda s: s.mode()[0]).unstack().nunique(axis=1) > 1).mean()
    assert changed > 0.2                                # a real share of users switch main topic


def test_scales_to_100k_by_100k():
    ds = generate(100_000, 100_000, seed=0)
    assert ds.interactions.n_users == 100_000 and len(ds.catalog) == 100_000
    assert len(ds.interactions) > 1_000_000


def test_a_synthetic_spec_can_ask_for_short_histories():
    from fedrec.shared.data.pipeline import DataConfig, load_any
    dense = load_any(DataConfig(dataset="synthetic:300x100")).interactions.frame
    sparse = load_any(DataConfig(dataset="synthetic:300x100:6")).interactions.frame
    assert len(sparse) / 300 < 9 < 15 < len(dense) / 300
