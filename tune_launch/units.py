"""Byte units, once: memory plans, preflight, hardware reports and consolidation all speak GiB."""

GIB = 1024**3
MIB = 1024**2
