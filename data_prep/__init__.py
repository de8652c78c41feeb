"""Data preparation for dynamic batch loading: local corpus, tokenization to MDS, reference losses."""
