"""The wire contract: annotations round-trip, malformed ones are refused, counts add up."""

import numpy as np
import pytest

from irminsul.engine_adapter.contract import (
    WIRE_VERSION,
    Annotation,
    ChunkRef,
    ContractError,
    ReuseCounts,
    seq_hash,
)


def _annotation(ids):
    return Annotation(
        num_tokens=len(ids),
        seq_hash=seq_hash(ids),
        chunks=(ChunkRef("a" * 32, 0, 3), ChunkRef("b" * 32, 3, len(ids))),
        anchors=(0, 3),
        namespace="tenant1",
        model_fingerprint="fp",
        policy="pic",
        policy_args={"k": 4},
        session="s1",
    )


def test_annotation_round_trips_through_json():
    ids = [5, 6, 7, 8, 9]
    ann = _annotation(ids)
    back = Annotation.from_json(ann.to_json())
    assert back == ann
    assert back.matches(ids)
    assert back.to_json()["wire_version"] == WIRE_VERSION


def test_annotation_does_not_match_other_tokens():
    ann = _annotation([5, 6, 7, 8, 9])
    assert not ann.matches([5, 6, 7, 8, 10])
    assert not ann.matches([5, 6, 7, 8])


def test_seq_hash_is_dtype_independent():
    ids = [1, 2, 3, 129_279]
    assert seq_hash(ids) == seq_hash(np.asarray(ids, np.int64)) == seq_hash(np.asarray(ids))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(wire_version=99),
        lambda d: d.pop("num_tokens"),
        lambda d: d.update(chunks=[["a", 0, 2], ["b", 3, 5]]),  # gap
        lambda d: d.update(chunks=[["a", 0, 3], ["b", 3, 4]]),  # does not reach num_tokens
        lambda d: d.update(chunks=[["a", 0, 0], ["b", 0, 5]]),  # empty chunk
        lambda d: d.update(chunks="nope"),
    ],
)
def test_malformed_annotations_are_refused(mutate):
    d = _annotation([5, 6, 7, 8, 9]).to_json()
    mutate(d)
    with pytest.raises(ContractError):
        Annotation.from_json(d)


def test_annotation_must_be_an_object():
    with pytest.raises(ContractError):
        Annotation.from_json(["not", "an", "object"])


def test_reuse_counts_must_add_up():
    c = ReuseCounts(
        prompt_tokens=10, exact_prefix_tokens=2, reused_tokens=5, recomputed_tokens=1, new_tokens=2
    )
    assert c.saved_tokens == 7
    assert ReuseCounts.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="add up"):
        ReuseCounts(prompt_tokens=10, exact_prefix_tokens=2, reused_tokens=5)
