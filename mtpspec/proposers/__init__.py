"""Proposers: n-gram prompt lookup, a separate draft model, and the MTP head (``mtp``)."""
