"""Building fused models: maps engine, resizing, data, zoo, evaluation, API and CLI."""
