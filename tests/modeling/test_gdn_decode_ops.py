"""A Gated DeltaNet layer's decode token through its joined ops: the three short convolutions as one op
(`causal_conv1d_group`) and the gates with the delta rule as one (`gated_delta_rule_decode_step`); the same values
as the ops they stand in for, taken only where they may."""

import pytest
import torch

from helpers import CudaLike, set_current_cuda_device, text_ids, tiny_model
from infinitevl_hf.modeling import gated_deltanet
from infinitevl_hf.modeling.ops import causal_conv1d, fused_recurrent_gated_delta_rule
from infinitevl_hf.modeling.ops.causal_conv1d import _group_fits, causal_conv1d_group
from infinitevl_hf.modeling.ops.gated_delta_rule import gated_delta_rule_decode_step, gdn_gates


def test_the_decode_step_op_equals_the_gates_and_the_recurrent_rule_for_one_token():
    torch.manual_seed(0)
    batch, heads, d_k, d_v = 2, 3, 8, 16
    q, k, v = torch.randn(batch, 1, heads, d_k), torch.randn(batch, 1, heads, d_k), torch.randn(batch, 1, heads, d_v)
    a, b = torch.randn(batch, 1, heads) * 4, torch.randn(batch, 1, heads)
    A_log, dt_bias = torch.randn(heads), torch.randn(heads)
    state = torch.randn(batch, heads, d_k, d_v) * 0.1
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    expected, expected_state = fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state.clone(),
                                                                output_final_state=True, use_qk_l2norm_in_kernel=True)
    own = state.clone()
    o = gated_delta_rule_decode_step(q.view(batch, -1), k.view(batch, -1), v.view(batch, -1), a.view(batch, -1),
                                     b.view(batch, -1), A_log, dt_bias, own)
    torch.testing.assert_close(o.view(expected.shape), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(own, expected_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_states", [True, False])
def test_the_conv_group_equals_each_convolution(with_states):
    torch.manual_seed(0)
    sizes = (6, 6, 10)
    row = torch.randn(2, 1, sum(sizes))
    xs = row.split(sizes, dim=-1)
    weights = tuple(torch.randn(d, 4) for d in sizes)
    biases = tuple(torch.randn(d) for d in sizes)
    states = tuple(torch.randn(2, d, 3) for d in sizes) if with_states else None
    expected = [causal_conv1d(x, w, bb, "silu", s.clone() if s is not None else None, True)
                for x, w, bb, s in zip(xs, weights, biases, states or (None,) * 3)]
    outputs, finals = causal_conv1d_group(xs, weights, biases, "silu", states, True, state_in_place=True)
    for got, final, (y, state) in zip(outputs, finals, expected):
        torch.testing.assert_close(got, y)
        torch.testing.assert_close(final, state)
    if with_states:
        assert all(final is s for final, s in zip(finals, states))  # written where they stand


def test_the_joined_conv_kernel_takes_three_cached_states_updated_in_place(monkeypatch):
    set_current_cuda_device(monkeypatch, 0)

    def meta(*shape, dtype=torch.bfloat16):
        return CudaLike(torch.empty(*shape, device="meta", dtype=dtype))

    xs = (meta(2, 1, 8), meta(2, 1, 8), meta(2, 1, 16))
    weights = (meta(8, 4), meta(8, 4), meta(16, 4))
    states = (meta(2, 8, 3), meta(2, 8, 3), meta(2, 16, 3))
    with torch.no_grad():
        assert _group_fits(xs, weights, (None,) * 3, "silu", states, True, None, True) is None
        assert "in place" in _group_fits(xs, weights, (None,) * 3, "silu", states, True, None, False)
        assert "in place" in _group_fits(xs, weights, (None,) * 3, "silu", (None,) * 3, True, None, True)
        assert "three" in _group_fits(xs[:2], weights[:2], (None,) * 2, "silu", states[:2], True, None, True)
        other = (states[0], states[1], meta(2, 16, 3, dtype=torch.float32))
        assert "dtype" in _group_fits(xs, weights, (None,) * 3, "silu", other, True, None, True)
        prompt = (meta(2, 5, 8), meta(2, 5, 8), meta(2, 5, 16))
        assert _group_fits(prompt, weights, (None,) * 3, "silu", states, True, None, True) == "more than one token per row"


def _decode_tokens(model, steps=3):
    """Greedy tokens after a prompt, fed back one at a time over the cache, and the last step's logits."""
    prompt = text_ids(2, 9)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, tokens = out.past_key_values, [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(steps):
            out = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1), out.logits


def test_decode_tokens_take_the_joined_ops_once_per_layer_with_the_uncached_values(monkeypatch):
    model = tiny_model()
    calls = {"conv": 0, "rule": 0}
    group, step = gated_deltanet.causal_conv1d_group, gated_deltanet.gated_delta_rule_decode_step

    def counted_group(xs, *args, **kwargs):
        calls["conv"] += xs[0].shape[1] == 1
        return group(xs, *args, **kwargs)

    def counted_step(*args, **kwargs):
        calls["rule"] += 1
        return step(*args, **kwargs)

    monkeypatch.setattr(gated_deltanet, "causal_conv1d_group", counted_group)
    monkeypatch.setattr(gated_deltanet, "gated_delta_rule_decode_step", counted_step)
    tokens, logits = _decode_tokens(model)
    gdn_layers = model.config.text_config.layer_types.count("linear_attention")
    assert calls == {"conv": 3 * gdn_layers, "rule": 3 * gdn_layers}
    with torch.no_grad():  # the whole sequence at once, without a cache: the last position's logits
        whole = model(input_ids=torch.cat([text_ids(2, 9), tokens[:, :-1]], 1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-4)


def test_a_hooked_convolution_is_called_as_a_module():
    model = tiny_model()
    expected_tokens, expected_logits = _decode_tokens(model)
    layer = next(m for m in model.modules() if isinstance(m, gated_deltanet.InfiniteVLGatedDeltaNet))
    seen = []
    layer.k_conv1d.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    tokens, logits = _decode_tokens(model)
    assert seen == [9, 1, 1, 1]  # the prompt, then each decode token
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits)


def test_a_decode_token_with_gradients_on_takes_the_differentiable_path(monkeypatch):
    """An eval-mode model called with autograd on (fine-tuning through a cache, probing): the decode-step op has
    no backward, so the layer takes the general path, the states it reads are not overwritten (its backward needs
    them), and gradients reach the projections."""
    model = tiny_model()
    prompt = text_ids(1, 6)
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    taken = []
    step = gated_deltanet.gated_delta_rule_decode_step
    monkeypatch.setattr(gated_deltanet, "gated_delta_rule_decode_step", lambda *a, **k: (taken.append(1), step(*a, **k))[1])
    logits = model(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True).logits
    logits.float().pow(2).mean().backward()
    layer = next(m for m in model.modules() if isinstance(m, gated_deltanet.InfiniteVLGatedDeltaNet))
    assert not taken
    assert layer.q_proj.weight.grad is not None and layer.q_proj.weight.grad.abs().sum() > 0
