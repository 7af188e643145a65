"""Measuring tools: `parallel-yolo compare` (memory, communication and speed of strategies beside theory).

Layer 8: may import the runtime; the runtime (engine/ and below) never imports tools/. Only the CLI imports it.
"""
