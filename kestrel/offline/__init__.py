"""Training, evaluation and the event simulator: batch work over logs, never on the worker's hot path."""
