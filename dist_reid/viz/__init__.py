"""Figures researchers read their models through (matplotlib, PNG, readable without the code)."""
