"""Evaluation with the standard protocols: retrieval (ITC + ITM re-rank) and captioning."""
