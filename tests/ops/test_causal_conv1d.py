"""Causal conv1d reference against nn.Conv1d, stateful stepping and packed sequences (CPU)."""

import pytest
import torch
import torch.nn.functional as F

from infinitevl_hf.modeling.ops import causal_conv1d, torch_causal_conv1d
from infinitevl_hf.modeling.ops import dispatch as backend_mod


def make(B, T, D, W, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen).to(dtype)
    conv = torch.nn.Conv1d(D, D, W, groups=D, padding=W - 1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(D, 1, W, generator=gen))
        conv.bias.copy_(torch.randn(D, generator=gen))
    return x, conv


def conv_ref(conv, x, activation):
    y = conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
    return F.silu(y) if activation else y


@pytest.mark.parametrize("activation", ["silu", "swish", None])
@pytest.mark.parametrize("B,T,D,W", [pytest.param(*c, id="B{}-T{}-D{}-W{}".format(*c))
                                     for c in [(1, 1, 8, 4), (2, 2, 8, 4), (2, 37, 16, 4), (1, 20, 8, 2)]])
def test_matches_nn_conv1d(activation, B, T, D, W):
    x, conv = make(B, T, D, W)
    y, state = torch_causal_conv1d(x, conv.weight[:, 0], conv.bias, activation=activation)
    assert state is None
    torch.testing.assert_close(y, conv_ref(conv, x, activation), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 2, 3, 10])
def test_final_state_is_last_inputs(T):
    # T < W-1 included: the state must still hold the tail of (initial_state ++ x)
    x, conv = make(2, T, 8, 4)
    h0 = torch.randn(2, 8, 3)
    _, state = torch_causal_conv1d(x, conv.weight[:, 0], conv.bias, initial_state=h0, output_final_state=True)
    full = torch.cat([h0, x.transpose(1, 2)], dim=-1)
    torch.testing.assert_close(state, full[..., -3:])
    _, state0 = torch_causal_conv1d(x, conv.weight[:, 0], output_final_state=True)
    torch.testing.assert_close(state0, F.pad(x.transpose(1, 2), (3, 0))[..., -3:])


@pytest.mark.parametrize("split", [1, 2, 5])
def test_stepwise_equals_one_shot(split):
    x, conv = make(2, 12, 8, 4)
    w, b = conv.weight[:, 0], conv.bias
    y_full, s_full = torch_causal_conv1d(x, w, b, output_final_state=True)
    ys, state = [], None
    y, state = torch_causal_conv1d(x[:, :split], w, b, initial_state=state, output_final_state=True)
    ys.append(y)
    for t in range(split, 12):  # decode: one token at a time carrying the state
        y, state = torch_causal_conv1d(x[:, t : t + 1], w, b, initial_state=state, output_final_state=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=1), y_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, s_full)


@pytest.mark.parametrize("use_h0", [False, True], ids=["no_h0", "h0"])
def test_cu_seqlens_isolation(use_h0):
    lens = [5, 1, 2, 9]
    D, W = 8, 4
    _, conv = make(1, 1, D, W)
    w, b = conv.weight[:, 0], conv.bias
    xs = [torch.randn(1, n, D) for n in lens]
    h0 = torch.randn(len(lens), D, W - 1) if use_h0 else None
    cu = torch.tensor([0, 5, 6, 8, 17])
    y, state = torch_causal_conv1d(torch.cat(xs, dim=1), w, b, initial_state=h0, output_final_state=True,
                                   cu_seqlens=cu)
    assert state.shape == (4, D, W - 1)
    for i, x_i in enumerate(xs):
        y_i, s_i = torch_causal_conv1d(x_i, w, b, initial_state=h0[i : i + 1] if use_h0 else None,
                                       output_final_state=True)
        torch.testing.assert_close(y[:, cu[i] : cu[i + 1]], y_i)
        torch.testing.assert_close(state[i : i + 1], s_i)


def bf16_run():
    x, conv = make(2, 30, 16, 4, dtype=torch.bfloat16)
    y, state = torch_causal_conv1d(x, conv.weight[:, 0].bfloat16(), conv.bias.bfloat16(), output_final_state=True)
    return x, conv, y, state


def test_bf16_keeps_dtype():
    _, _, y, state = bf16_run()
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16


def test_bf16_is_close_to_the_float_reference():
    x, conv, y, _ = bf16_run()
    ref = conv_ref(conv, x.float(), "silu")
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_gradients_flow():
    x, conv = make(2, 9, 8, 4)
    x.requires_grad_()
    w = conv.weight[:, 0].detach().clone().requires_grad_()
    y, _ = torch_causal_conv1d(x, w, conv.bias)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    conv_ref(conv, x2, "silu").square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, conv.weight.grad[:, 0], rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    x, conv = make(1, 4, 8, 4)
    with pytest.raises(ValueError, match=r"\[D, W\]"):
        torch_causal_conv1d(x, conv.weight)
    with pytest.raises(ValueError, match="activation"):
        torch_causal_conv1d(x, conv.weight[:, 0], activation="relu")
    with pytest.raises(ValueError, match="initial_state"):
        torch_causal_conv1d(x, conv.weight[:, 0], initial_state=torch.zeros(1, 8, 4))


def test_dispatcher_uses_torch_on_cpu(monkeypatch):
    monkeypatch.setitem(backend_mod._FLA_LOADERS, "causal_conv1d", lambda: (object(), None))
    x, conv = make(2, 10, 8, 4)
    h0 = torch.randn(2, 8, 3)
    assert backend_mod.select("causal_conv1d", x, conv.weight) == "torch"
    y, s = causal_conv1d(x, conv.weight[:, 0], conv.bias, initial_state=h0, output_final_state=True)
    y_ref, s_ref = torch_causal_conv1d(x, conv.weight[:, 0], conv.bias, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)
