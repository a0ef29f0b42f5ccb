"""Document text cut into shaded pieces: one piece per token (or per character a byte-level BPE split over several
tokens), each carrying its per-token term; and the window of the document that the report shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """A piece of a document's text and the summed per-token terms of the tokens that make it up."""

    text: str
    term: float
    special: bool = False  # a special token (eos) with no text of its own


def token_segments(tokenizer, text: str, token_ids: list[int], terms: np.ndarray) -> list[Segment]:
    """Pieces of `text` aligned with the document's tokens (`token_ids`, as the corpus pass cut them, eos included).

    The token ids must start with the tokenisation of `text` (the corpus pass appends eos and may fold out a lone
    trailing token); each piece runs from the end of the previous one to the end of its token's character span, so
    the pieces concatenate to the text. Tokens that share characters (a UTF-8 character split across byte-level
    tokens) are merged into one piece. A tokenizer without offsets falls back to decoding each token alone.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded.get("offset_mapping")
    text_ids = list(encoded["input_ids"])
    n_text = min(len(text_ids), len(token_ids))
    if offsets is None or text_ids[:n_text] != list(token_ids[:n_text]):
        return [Segment(tokenizer.decode([t]), float(term)) for t, term in zip(token_ids, terms)]
    segments: list[Segment] = []
    end = 0
    for index in range(n_text):
        start, stop = offsets[index]
        if segments and start < end:
            last = segments[-1]
            segments[-1] = Segment(last.text + text[end:stop], last.term + float(terms[index]))
        else:
            segments.append(Segment(text[end:stop], float(terms[index])))
        end = max(end, stop)
    if n_text == len(text_ids) and end < len(text) and segments:
        last = segments[-1]
        segments[-1] = Segment(last.text + text[end:], last.term)
    for token, term in zip(token_ids[n_text:], terms[n_text:]):
        segments.append(Segment(tokenizer.decode([token]), float(term), special=token in tokenizer.all_special_ids))
    return segments


def best_window(magnitudes: np.ndarray, width: int) -> tuple[int, int]:
    """[start, stop) of the `width` consecutive entries with the largest sum of `magnitudes` (all of them if fewer)."""
    n = len(magnitudes)
    if n <= width:
        return 0, n
    sums = np.convolve(magnitudes, np.ones(width), mode="valid")
    start = int(np.argmax(sums))
    return start, start + width
