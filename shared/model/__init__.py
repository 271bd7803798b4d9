"""The recommender (item tower + user interest encoder), its weights as the federation shares them, and training."""
