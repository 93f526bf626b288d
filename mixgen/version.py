"""The package version, in a module of its own so that any module can name it without importing
the package face (whose lazy names reach the dataset reader)."""

__version__ = "0.4.0"
