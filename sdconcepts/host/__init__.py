"""Adapters for host web UIs (A1111 and Forge); the only place that imports the host's ``modules.*``."""
