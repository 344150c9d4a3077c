"""Searching over compression choices: spaces kept as data, strategies that propose and observe,
and the objectives they trade (quality, size, latency). Heavy dependencies (optuna) load lazily."""
