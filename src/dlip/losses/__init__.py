"""Training objectives; each loss returns named terms, the caller sums the weighted total."""
