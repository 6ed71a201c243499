"""Tellback server."""
