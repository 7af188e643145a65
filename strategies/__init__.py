"""The strategy presets: one YAML per named strategy (`strategy=zero3` reads zero3.yaml), the knobs a user edits.
Shipped as the package data `parallel_yolo.presets` (setup.py), so a plain `pip install` finds them; the code that
reads them and runs each strategy is `parallel_yolo/strategies/` (registry.py's `preset`)."""
