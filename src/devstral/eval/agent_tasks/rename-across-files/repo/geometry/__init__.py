"""Rectangles and reports about them."""
