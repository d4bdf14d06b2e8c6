"""Amortized in-context PK models: synthetic prior, in-context forecaster, training, API."""
