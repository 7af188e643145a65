"""Data: Ultralytics' dataset pipeline behind a distributed sampler, the loaders' settings, the synthetic demo
dataset, and the data-wait report.

Layer 4: imports config/, launch/ and the leaves.
"""
