"""Data: the offline demo corpus, its BPE tokenizer, and streaming of corpora/queries into loss-ready batches."""
