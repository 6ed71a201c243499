"""Domain packages: controllers -> services -> database."""
