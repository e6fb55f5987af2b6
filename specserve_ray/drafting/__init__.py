"""Drafters that need no draft model: prompt lookup (n-gram) proposals and their
packing into the same `Proposal` a draft model produces."""
