"""The loss and label-sampling conventions of models/lm.py."""

import torch

from distributed_astra.models.lm import IGNORE_INDEX, sample_labels, summed_token_loss


def test_summed_token_loss_sums_over_labelled_positions_only():
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX, 3], [0, 2, 4, IGNORE_INDEX]])
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = torch.stack([-(log_probs[0, 0, 1] + log_probs[0, 2, 3]), -(log_probs[1, 0, 2] + log_probs[1, 1, 4])])
    torch.testing.assert_close(summed_token_loss(logits, labels), expected)


def test_sampled_labels_follow_the_model_distribution_and_keep_the_mask():
    probs = torch.tensor([0.05, 0.6, 0.0, 0.3, 0.05], dtype=torch.float64)
    logits = probs.clamp_min(1e-300).log().expand(1, 20001, 5).clone()
    labels = torch.zeros(1, 20001, dtype=torch.long)
    labels[0, 7] = IGNORE_INDEX
    sampled = sample_labels(logits, labels, torch.Generator().manual_seed(0))
    assert sampled[0, 0] == 0 and sampled[0, 7] == IGNORE_INDEX
    drawn = sampled[0, 1:][sampled[0, 1:] != IGNORE_INDEX]
    frequencies = torch.bincount(drawn, minlength=5).double() / len(drawn)
    # 20000 draws: the standard error of each frequency is at most 0.0035; 5 sigma.
    torch.testing.assert_close(frequencies, probs, atol=0.018, rtol=0)
    assert frequencies[2] == 0
