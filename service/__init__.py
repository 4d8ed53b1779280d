"""The spkserve server, its HTTP gateway, the command line and the Python client."""

from __future__ import annotations


def package_version() -> str:
    """The installed spkserve package's version ("0+source" in a checkout that was not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spkserve")
    except PackageNotFoundError:
        return "0+source"
