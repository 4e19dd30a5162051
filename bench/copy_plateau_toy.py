"""How long a small MLA model waits before it learns to copy, on the CPU.

The shipped model's copy circuit forms only after ~220 M tokens of an H100 run
(bench/results/2026-12-06-h100-copy-plateau.txt), too late and too costly to study there. This
is a stand-in small enough for this machine: a two-layer model of the shipped model's kind
(``irminsul-mla``'s MLA and YaRN rope, 128 wide, its 4096-token vocabulary) trained on rows of a
random block of 8-32 tokens repeated, with the loss only on the repeats. ln(4096) = 8.32 is a
model that has not learnt to copy; copying drives it towards 0. It prints the loss (an
exponential moving average over steps) every 100 steps, to compare settings: the initial
weights' scale, the learning rate, weight decay.

    python bench/copy_plateau_toy.py --name base [--init-std 0.02] [--lr 2e-3] [--wd 0.1] [--steps 3000]

One thread, ~0.33 s a step here. A stand-in, not the real model: what shortens its wait is a
thing to try on the GPU, not a result about the shipped model.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="run", help="label of each printed line")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--init-std", type=float, default=0.02, help="std of the initial weights")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay")
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    from transformers import DeepseekV2ForCausalLM

    from irminsul.engine_adapter.embedded.presets import preset_config

    torch.set_num_threads(1)
    cfg = preset_config("irminsul-mla", bos_token_id=0, eos_token_id=[1, 7], pad_token_id=2,
                        hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=2,
                        initializer_range=a.init_std)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=a.wd)
    gen = torch.Generator().manual_seed(1)
    rows, vocab, first_id = 16, cfg.vocab_size, 8
    t0, ema = time.time(), None
    for step in range(a.steps):
        block = torch.randint(8, 33, (rows,), generator=gen)
        tokens = torch.randint(first_id, vocab, (rows, 32), generator=gen)
        t = torch.arange(a.seq)
        body = tokens.gather(1, t[None] % block[:, None])
        ids = torch.cat([torch.zeros(rows, 1, dtype=torch.long), body], 1)
        w = (t[None] >= block[:, None]).float()  # the block's first copy is unpredictable
        logits = model(input_ids=ids[:, :-1]).logits
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (ce.view_as(w) * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"{a.name} step {step} loss(ema) {ema:.3f} {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
