"""What a run measures about itself: memory accounting and peaks (memory.py), collectives counted or checked for
host tensors (comm.py), and the run's CSV log (runlog.py). Used by the runtime and, for their figures, by tools/.

Layer 2: imports only the leaves (errors, urls, the library adapters).
"""
