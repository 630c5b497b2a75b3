"""Data sources and condition corruption (paper section 2)."""
