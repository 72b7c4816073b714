"""Loading models (the embedded SmolLM2, hub names, local directories, tiny test models) and what we read off a bridge."""
