"""Data generators independent of Kestrel's own simulator (payment histories, interaction logs), for evaluating
models on patterns they were not designed around."""
