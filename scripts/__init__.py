"""The project's command-line scripts (recipe search, probes, the lock guard), run from the project root;
``scripts.attention_probe`` imports ``scripts.recipe``, so it runs as ``python -m scripts.attention_probe``."""
