"""The one version string: fastnorm.__version__ and setup.py both read it."""
__version__ = "0.1.0"
