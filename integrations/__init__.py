"""Framework integrations: thin wrappers that translate training events into core calls."""
