"""Query gradients, per-document training-gradient inner products, and streaming top-k."""
