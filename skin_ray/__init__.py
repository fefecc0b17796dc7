"""skin-ray: classify skin-lesion images as Cancer or Non_Cancer, on one machine or a Ray cluster."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("skin-ray")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
