"""The training script's loss (examples/models/train_model.py): the weighted loss, and the
loss on the repeat rows that tells the script the copy circuit has formed (drills start then)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
sys.path.insert(0, str(MODELS))
import train_model

from irminsul.engine_adapter.embedded.presets import preset_config


def test_copy_loss_is_the_loss_on_the_first_rows_alone():
    from transformers import DeepseekV2ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(preset_config("irminsul-aux")).eval()
    x = torch.randint(8, 4096, (5, 40))
    y = torch.randint(8, 4096, (5, 40))
    w = torch.rand(5, 40) * (torch.rand(5, 40) > 0.3)
    with torch.no_grad():
        loss, none = train_model.weighted_loss(model, x, y, w)
        same, copy = train_model.weighted_loss(model, x, y, w, copy_rows=2)
        alone, _ = train_model.weighted_loss(model, x[:2], y[:2], w[:2])
        rest, _ = train_model.weighted_loss(model, x[2:], y[2:], w[2:])
    assert none is None
    assert torch.equal(loss, same)
    torch.testing.assert_close(copy, alone)
    # the whole batch's loss is the weight-averaged mix of the two parts
    mix = (alone * w[:2].sum() + rest * w[2:].sum()) / w.sum()
    torch.testing.assert_close(loss, mix)
    assert not torch.isclose(copy, rest)


def test_then_stage_replaces_only_the_options_it_names():
    import argparse

    run = argparse.Namespace(lr=2e-3, warmup=0.04, chat_share=0.45, copy_share=0.3,
                             retrieval_share=0.6, retrieval_facts=4, retrieval_questions=1,
                             long_frac=0.0, seq=2048, then="--lr 1e-3 --long-frac 0.4 "
                                                            "--copy-share 0.1")
    second = train_model.then_stage(run)
    assert (second.lr, second.long_frac, second.copy_share) == (1e-3, 0.4, 0.1)
    # the rest is the run's own
    assert (second.warmup, second.chat_share, second.seq) == (0.04, 0.45, 2048)
    assert run.lr == 2e-3 and run.copy_share == 0.3


def test_then_stage_refuses_an_option_a_stage_cannot_change(capsys):
    import argparse

    run = argparse.Namespace(lr=2e-3, warmup=0.04, chat_share=0.45, copy_share=0.15,
                             retrieval_share=0.6, retrieval_facts=4, retrieval_questions=1,
                             long_frac=0.25, seq=2048, then="--seq 512")
    with pytest.raises(SystemExit) as e:
        train_model.then_stage(run)
    assert e.value.code == 2
    assert "--seq 512" in capsys.readouterr().err
