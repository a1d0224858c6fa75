"""The online feature store and what every layer shares: event contracts, topic names, the key registry."""
