"""Yoi: named, long-lived agent processes (Pods) that know about each other."""

__version__ = "0.1.0"
