"""tandem: a few-step student and its slow teacher, working in tandem."""

__version__ = "0.1.0"
