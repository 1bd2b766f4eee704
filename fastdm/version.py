"""The one place fastdm's version is kept (pyproject.toml reads it; every command's --version prints it)."""

__version__ = "0.1.0"
