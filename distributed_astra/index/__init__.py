"""The projected gradient store (Arrow IPC) and faiss indexes over it; the `index` and `search` stages."""
