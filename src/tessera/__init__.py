"""tessera: an auth and session service that enforces a privacy policy in code."""

__version__ = "0.1.0"
