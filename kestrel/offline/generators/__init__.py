"""Payment-history generators independent of Kestrel's own simulator, for evaluating models on unseen patterns."""
