"""Getting events in: the validating producer client, raw-record validation, CSV replay."""
