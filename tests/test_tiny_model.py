"""The demo's tiny GPT-2: construction and a short training run."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from distributed_astra.data.sequences import collate_sequences
from distributed_astra.errors import DastraError
from distributed_astra.models.load import load_causal_lm
from distributed_astra.models.modules import select_tracked_modules
from distributed_astra.models.tiny import build_tiny_gpt2, mean_token_loss, train_tiny_gpt2


def _batches(vocab: int, count: int = 3, batch_size: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for b in range(count):
        seqs = []
        for i in range(batch_size):
            n = int(torch.randint(3, length + 1, (1,), generator=gen))
            seqs.append((torch.randint(1, vocab, (n,), generator=gen).tolist(), b * batch_size + i))
        out.append(collate_sequences(seqs, pad_id=0))
    return out


def test_build_is_eager_dropout_free_and_seeded():
    model = build_tiny_gpt2(vocab_size=300, n_layer=2, n_head=2, n_embd=32, max_length=16, seed=1)
    assert isinstance(model, GPT2LMHeadModel)
    assert model.config._attn_implementation == "eager"
    assert model.config.n_positions == 16 and model.config.vocab_size == 300
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    same = build_tiny_gpt2(300, 2, 2, 32, 16, seed=1)
    other = build_tiny_gpt2(300, 2, 2, 32, 16, seed=2)
    params = dict(model.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in same.named_parameters())
    assert not all(torch.equal(p, params[n]) for n, p in other.named_parameters())
    tracked = select_tracked_modules(model, ["transformer.h.*.mlp.c_fc", "transformer.h.*.attn.c_attn"])
    assert list(tracked) == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
                             "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]


def test_build_rejects_bad_head_count():
    with pytest.raises(DastraError, match="multiple of"):
        build_tiny_gpt2(300, 1, 3, 32, 16, seed=0)


def test_a_few_steps_lower_the_loss_and_the_model_reloads(tmp_path):
    torch.manual_seed(123)
    model = build_tiny_gpt2(vocab_size=64, n_layer=1, n_head=2, n_embd=32, max_length=16, seed=0)
    batches = _batches(64)
    with torch.no_grad():
        before = sum(float(mean_token_loss(model, b)) for b in batches) / len(batches)
    seen: list[tuple[int, float]] = []
    losses = train_tiny_gpt2(model, batches, steps=40, lr=1e-2, seed=0, on_step=lambda s, l: seen.append((s, l)))
    assert len(losses) == 40 and [s for s, _ in seen] == list(range(40))
    assert not model.training
    with torch.no_grad():
        after = sum(float(mean_token_loss(model, b)) for b in batches) / len(batches)
    assert after < 0.7 * before

    model.save_pretrained(tmp_path / "model")
    reloaded = load_causal_lm(str(tmp_path / "model"), None, "float32")
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=batches[0]["input_ids"]).logits,
                              model(input_ids=batches[0]["input_ids"]).logits, atol=1e-5)


def test_training_is_deterministic_and_accepts_an_epoch_callable():
    batches = _batches(64, count=2)
    calls: list[int] = []

    def epoch(e: int):
        calls.append(e)
        return batches[::-1] if e % 2 else batches

    runs = []
    for _ in range(2):
        model = build_tiny_gpt2(64, 1, 2, 32, 16, seed=0)
        runs.append(train_tiny_gpt2(model, epoch, steps=5, lr=1e-2, seed=0))
    assert runs[0] == runs[1]
    assert calls == [0, 1, 2, 0, 1, 2]
    model = build_tiny_gpt2(64, 1, 2, 32, 16, seed=0)
    assert len(train_tiny_gpt2(model, lambda: iter(batches), steps=3, lr=1e-2, seed=0)) == 3
    with pytest.raises(DastraError, match="no training batches"):
        train_tiny_gpt2(model, [], steps=3, lr=1e-2, seed=0)
