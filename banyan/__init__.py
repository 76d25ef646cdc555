"""Banyan: a simple distributed job submission system."""

__version__ = "0.1.0"
