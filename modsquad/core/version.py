"""The package version, in the bottom layer so that checkpoint metadata can record it without importing the API."""

__version__ = "0.1.0"
