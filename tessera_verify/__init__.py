"""Verify tessera tokens in another service (no tessera server code needed). See README."""
