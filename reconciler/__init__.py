"""Comparing what PacSpace claims with what we recorded, and acting on the gaps."""
