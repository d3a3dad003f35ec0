"""The run folder every stage hands the next: checkpoints (`checkpoint.py`: atomic, verified writes of the
training state and the weights file, the latest by step, the run lock), the one weights reader
(`weights.py`: a run's verified weights or a public checkpoint -> a flat state dict), the JSONL log and its
reader (`log.py`), and the runtime (`runtime.py`: device, ranks, AMP dtype).

May import: only the package root (its errors), so that every stage may import it; it imports no stage.
"""
