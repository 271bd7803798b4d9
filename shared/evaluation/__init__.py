"""Ranking evaluation: metrics, the full-ranking evaluator, baselines and paired comparison of runs."""
