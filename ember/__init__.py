"""EMBER: embedding erasure framework."""
