"""Quality: RULER-style tasks, the eval runner, perplexity, reports and plots, the kvpress baseline."""
