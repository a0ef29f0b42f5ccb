"""Evaluation of attribution quality."""
