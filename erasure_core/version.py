"""The pack's version: one place, read by the package root and by the metadata of every saved file."""

__version__ = "0.2.0"
