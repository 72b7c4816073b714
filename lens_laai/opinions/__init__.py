"""Opinion tasks: surveys and their loaders, prompts, divergences, the survey fit and its evaluation."""
