"""The package version (one place: the root package and the file format's reader read it)."""

__version__ = "0.1.0"
