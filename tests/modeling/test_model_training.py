"""Training: loss with labels, gradients reach every parameter, gradient checkpointing gives the same gradients."""

import torch

from helpers import image_inputs, tiny_model


def _batch():
    ids, pixel_values, grid = image_inputs(grid=(1, 4, 4), prefix=6, suffix=14)
    labels = ids.clone()
    labels[:, :8] = -100  # prompt tokens carry no loss
    return dict(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, labels=labels)


def test_loss_with_labels_is_finite_positive():
    model = tiny_model().train()
    loss = model(**_batch()).loss
    assert torch.isfinite(loss) and loss > 0


def test_gradients_reach_every_parameter():
    model = tiny_model().train()
    loss = model(**_batch()).loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reached: {missing}"


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = _batch()
    plain = tiny_model().train()
    plain(**batch).loss.backward()
    checkpointed = tiny_model().train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.model.language_model.gradient_checkpointing
    checkpointed(**batch).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_few_steps_lower_the_loss():
    model = tiny_model().train()
    batch = _batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
