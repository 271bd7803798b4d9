"""Differential privacy: accounting (noise for a target epsilon, epsilon spent) and per-example gradients of the item tower for Opacus."""
