"""A/B experiments: their store and audit log (definitions and assignment are in kestrel.models)."""
