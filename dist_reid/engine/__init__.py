"""Jobs that tie config, data, models and evaluation together."""
