"""The training runtime: build the train state (model, strategy, optimizer, EMA, criterion), the loop and its step,
the recipe (learning rate and warm-up), activation checkpointing, Ultralytics' callbacks, validation, resuming and
consolidating a checkpoint into one file.

Layer 7: may import every layer below (config, monitor, launch, optim, data, tasks, checkpoint, strategies), never
tools/ or the CLI. Never branches on the backend: it asks the strategy.
"""
