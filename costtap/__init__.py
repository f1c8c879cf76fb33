"""costtap: a sidecar forward proxy that meters the AI traffic of existing services."""

__version__ = "0.1.0"
