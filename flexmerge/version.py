"""The package's version, in a module of its own so that any layer can name it (an artifact's
manifest, the resume key) without importing the package root and the API it loads."""

__version__ = "0.1.0"
