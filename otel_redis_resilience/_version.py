"""The package version, importable by the face and by telemetry (which sits below it)."""

__version__ = "0.1.0"
