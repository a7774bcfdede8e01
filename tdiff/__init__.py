"""tdiff: small diffusion transformers that share their blocks.

Importing the package is cheap (no torch); the pieces live in submodules.
"""

__version__ = "0.1.0"
