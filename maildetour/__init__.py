"""maildetour: forward mail at once, detour instead of bouncing, never reveal hidden addresses."""

__version__ = "0.1.0"
