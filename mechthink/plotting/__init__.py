"""Plotting for mechthink results: matplotlib figures and circuitsvis HTML; never recomputes."""
