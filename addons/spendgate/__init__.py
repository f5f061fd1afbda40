"""Spendgate: per-user keys, an audit log and cost caps in front of hosted model APIs."""

__version__ = "0.1.0"
