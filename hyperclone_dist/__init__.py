"""hyperclone-dist: grow small pretrained LMs into larger ones that compute the same function."""

__version__ = "0.1.0"
