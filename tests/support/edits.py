"""Token-ID prompts with the edits agents make between turns, for the engine's tests."""

from __future__ import annotations

import numpy as np


def header_and_reorder(g: np.random.Generator):
    """A prompt and its edit (another header, the sections reordered), each as (ids, anchors)
    with anchors at the header's end and the section starts, as the proxy would send them."""
    sections = [g.integers(10, 4000, n).astype(np.int32) for n in (70, 130, 90, 110)]

    def build(head, parts):
        ids = np.concatenate([head, *parts]).astype(np.int32)
        return ids, tuple(int(x) for x in np.cumsum([len(head)] + [len(p) for p in parts[:-1]]))

    warm = build(g.integers(10, 4000, 20), sections)
    edit = build(g.integers(10, 4000, 23), [sections[i] for i in (2, 0, 3, 1)])
    return warm, edit
