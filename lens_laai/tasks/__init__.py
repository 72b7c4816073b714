"""Task data, prompts and padded batches, and the record of which pairs a fit saw."""
