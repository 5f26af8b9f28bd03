"""The web page served at `/`: HTML, scripts and styles shipped inside the package (see router.py)."""

from .router import install, is_open_path

__all__ = ["install", "is_open_path"]
