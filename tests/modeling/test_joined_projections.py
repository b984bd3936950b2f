"""The module path's decode with its input projections joined (`joined_linear.project`) and its states written in
place (`state_in_place`): the same values as the plain calls, taken only where they may stand in for them."""

import pytest
import torch
from torch import nn

from helpers import text_ids, tiny_model
from infinitevl_hf.modeling.joined_linear import joined_weight, project
from infinitevl_hf.modeling.ops import causal_conv1d, chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from infinitevl_hf.speed.decode_step import DecodeStep


@pytest.fixture
def linear_calls(monkeypatch):
    """How many times an nn.Linear's own forward ran."""
    calls = []
    plain = nn.Linear.forward

    def counted(self, x):
        calls.append(self)
        return plain(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counted)
    return calls


def _decode(model, prompt, steps: int = 4) -> torch.Tensor:
    """Logits of a prompt and then of `steps` greedy tokens fed one at a time over a cache."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        for _ in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def test_laid_out_projections_decode_as_one_product_with_the_plain_calls_values(linear_calls):
    model = tiny_model()
    prompt = text_ids(2, 11)
    plain = _decode(model, prompt)
    calls_plain = len(linear_calls)

    DecodeStep.join_weights(model)  # the layout the speed path gives the weights before its first graph
    linear_calls.clear()
    joined = _decode(model, prompt)
    torch.testing.assert_close(joined, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(joined.argmax(-1), plain.argmax(-1))

    # The prompt calls each projection; each decode step runs, per layer, q/k/v(/a/b/g) and gate/up as one
    # product each, outside the modules: a GDN layer's 6 + 2 module calls and an attention layer's 3 + 2 go.
    # (o_proj and down_proj run as their product at decode with either layout: one module is laid out alone.)
    layers = model.config.text_config.layer_types
    skipped_per_step = sum(8 if kind == "linear_attention" else 5 for kind in layers)
    assert calls_plain - len(linear_calls) == 4 * skipped_per_step


def _group(n: int = 3, bias: bool = True, hidden: int = 8, same: bool = False) -> tuple[nn.Linear, ...]:
    torch.manual_seed(0)
    linears = tuple(nn.Linear(hidden, 4 + (0 if same else i), bias=bias) for i in range(n))
    DecodeStep._joined(linears, "weight", True)
    if bias:
        DecodeStep._joined(linears, "bias", True)
    return linears


@pytest.mark.parametrize("bias", [True, False])
def test_project_equals_each_call(bias, linear_calls):
    linears = _group(bias=bias)
    x = torch.randn(2, 1, 8)
    with torch.no_grad():
        got = project(x, linears)
        assert not linear_calls
        expected = [nn.functional.linear(x, m.weight, m.bias) for m in linears]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def _hooked(linears):
    linears[1].register_forward_hook(lambda *args: None)


def _instance_forward(linears):
    linears[2].forward = linears[2].forward  # what accelerate's hooks do: a forward of the instance


def _subclass(linears):
    class Adapted(nn.Linear):
        pass

    linears[0].__class__ = Adapted


def _separate_storage(linears):
    linears[1].weight.data = linears[1].weight.data.clone()


def _mixed_bias(linears):
    linears[2].bias = None


@pytest.mark.parametrize("change", [_hooked, _instance_forward, _subclass, _separate_storage, _mixed_bias])
def test_project_calls_each_module_where_one_product_would_skip_something(change, linear_calls):
    linears = _group()
    change(linears)
    assert joined_weight(linears) is None
    with torch.no_grad():
        project(torch.randn(1, 1, 8), linears)
    assert len(linear_calls) == 3


def test_project_calls_each_module_for_prompts_and_under_autograd(linear_calls):
    linears = _group()
    assert joined_weight(linears) is not None
    with torch.no_grad():
        project(torch.randn(1, 5, 8), linears)  # a prompt: several tokens per row
    assert len(linear_calls) == 3
    outputs = project(torch.randn(1, 1, 8), linears)  # gradients on: the modules' own calls, differentiable
    assert len(linear_calls) == 6 and all(o.requires_grad for o in outputs)


def test_a_global_forward_hook_sends_every_projection_through_its_module(linear_calls):
    linears = _group()
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        with torch.no_grad():
            project(torch.randn(1, 1, 8), linears)
    finally:
        handle.remove()
    assert len(linear_calls) == 3


def test_conv_state_in_place_overwrites_the_given_state_with_the_new_one():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 1, 6), torch.randn(6, 4), torch.randn(6)
    state = torch.randn(2, 6, 3)
    y, expected = causal_conv1d(x, weight, bias, "silu", state.clone(), True)
    own = state.clone()
    y_in_place, final = causal_conv1d(x, weight, bias, "silu", own, True, state_in_place=True)
    assert final is own
    torch.testing.assert_close(y_in_place, y)
    torch.testing.assert_close(own, expected)
    # a state of another dtype is left alone (a cache would replace it, not copy into it)
    other = state.double()
    _, final = causal_conv1d(x, weight, bias, "silu", other, True, state_in_place=True)
    assert final is not other and torch.equal(other, state.double())


@pytest.mark.parametrize("rule", [fused_recurrent_gated_delta_rule, chunk_gated_delta_rule])
def test_delta_rule_state_in_place_overwrites_the_given_state_with_the_new_one(rule):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    v, g, beta = torch.randn(2, 3, 2, 16), -torch.rand(2, 3, 2), torch.rand(2, 3, 2)
    state = torch.randn(2, 2, 8, 16)
    o, expected = rule(q, k, v, g, beta, None, state.clone(), True, use_qk_l2norm_in_kernel=True)
    own = state.clone()
    o_in_place, final = rule(q, k, v, g, beta, None, own, True, use_qk_l2norm_in_kernel=True, state_in_place=True)
    assert final is own
    torch.testing.assert_close(o_in_place, o)
    torch.testing.assert_close(own, expected)
    # without a state there is nothing to write over: a new one comes back
    _, fresh = rule(q, k, v, g, beta, None, None, True, use_qk_l2norm_in_kernel=True, state_in_place=True)
    assert fresh is not None and fresh.shape == state.shape


def test_a_kernel_that_writes_the_state_itself_is_handed_the_state_only_where_it_fits():
    from infinitevl_hf.modeling.ops.dispatch import Implementation
    from infinitevl_hf.modeling.ops.in_place import run_state_in_place

    handed = []

    def kernel(x, final_state=None):
        handed.append(final_state)
        return x, (final_state if final_state is not None else torch.ones(2, 3))

    state = torch.zeros(2, 3)
    out, final = run_state_in_place(Implementation("triton", kernel, None), (1,), {}, state, (2, 3), torch.float32)
    assert handed == [state] and final is state
    # another shape or dtype than the kernel writes: it computes beside, and the state is copied where it matches
    _, final = run_state_in_place(Implementation("triton", kernel, None), (1,), {}, state, (4, 3), torch.float32)
    assert handed[-1] is None and final is state and torch.equal(state, torch.ones(2, 3))
    other = torch.zeros(2, 3, dtype=torch.float64)
    _, final = run_state_in_place(Implementation("torch", kernel, None), (1,), {}, other, (2, 3), torch.float64)
    assert handed[-1] is None and final is not other and torch.equal(other, torch.zeros(2, 3, dtype=torch.float64))


def test_the_kept_layout_answer_follows_moved_and_replaced_weights():
    linears = _group()
    assert joined_weight(linears) is not None  # found, and kept on the first module
    linears[2].weight.data = linears[2].weight.data.clone()  # moved off the joined buffer
    assert joined_weight(linears) is None
    linears = _group()
    assert joined_weight(linears) is not None
    linears[0].weight = nn.Parameter(linears[0].weight.detach().clone())  # replaced
    assert joined_weight(linears) is None


def test_the_layout_runs_again_only_when_the_weights_moved(monkeypatch):
    from infinitevl_hf.speed import weight_layout

    model = tiny_model()
    joins = []
    join = DecodeStep.join_weights
    monkeypatch.setattr(DecodeStep, "join_weights", classmethod(lambda cls, m: (joins.append(m), join(m))))
    weight_layout.lay_out_weights(model)
    weight_layout.lay_out_weights(model)  # laid out already: nothing to check again
    assert len(joins) == 1
    mlp = model.model.language_model.layers[0].mlp
    assert joined_weight((mlp.gate_proj, mlp.up_proj)) is not None
    mlp.up_proj.weight.data = mlp.up_proj.weight.data.clone()  # moved off the joined buffer
    weight_layout.lay_out_weights(model)
    assert len(joins) == 2 and joined_weight((mlp.gate_proj, mlp.up_proj)) is not None


def test_the_gated_product_and_the_output_projection_equal_their_module_calls(linear_calls):
    from infinitevl_hf.modeling.joined_linear import apply_linear, project_glu

    gate_up = _group(n=2, bias=False, same=True)
    out = _group(n=1, bias=True)[0]
    for rows in (1, 3):  # one row (a matrix-vector product), then several
        x = torch.randn(rows, 1, 8)
        with torch.no_grad():
            glu = project_glu(x, *gate_up)
            projected = apply_linear(x, out)
        assert not linear_calls
        expected = nn.functional.silu(x @ gate_up[0].weight.T) * (x @ gate_up[1].weight.T)
        torch.testing.assert_close(glu, expected)
        torch.testing.assert_close(projected, nn.functional.linear(x, out.weight, out.bias))
    _hooked(gate_up + (gate_up[0],))  # a hook on up_proj: both run as modules
    out.register_forward_hook(lambda *args: None)
    with torch.no_grad():
        project_glu(torch.randn(1, 1, 8), *gate_up)
        apply_linear(torch.randn(1, 1, 8), out)
    assert len(linear_calls) == 3


def test_one_row_under_autocast_takes_f_linear_not_the_matvec_kernel(monkeypatch):
    from infinitevl_hf.modeling import joined_linear

    calls = []
    matvec = joined_linear.matvec
    monkeypatch.setattr(joined_linear, "matvec", lambda *a, **k: (calls.append(1), matvec(*a, **k))[1])
    linears = _group(bias=True)
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        project(x, linears)
        assert len(calls) == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = project(x, linears)
    assert len(calls) == 1 and all(o.dtype == torch.bfloat16 for o in outputs)  # autocast's product, in its dtype


def test_a_single_linear_is_its_own_joined_weight(linear_calls):
    (out,) = _group(n=1, bias=True)
    weight, bias = joined_weight((out,))
    assert weight is out.weight and bias is out.bias
    _subclass((out,))
    assert joined_weight((out,)) is None


@pytest.fixture
def conv_group_calls(monkeypatch):
    """How many times a Gated DeltaNet ran its convolutions apart from its projections."""
    from infinitevl_hf.modeling import gated_deltanet

    calls = []
    group = gated_deltanet.causal_conv1d_group
    monkeypatch.setattr(gated_deltanet, "causal_conv1d_group", lambda *a, **k: (calls.append(1), group(*a, **k))[1])
    return calls


def test_laid_out_convolutions_run_inside_the_projection_at_decode_with_the_same_values(conv_group_calls,
                                                                                          monkeypatch):
    from infinitevl_hf.modeling import gated_deltanet

    model = tiny_model()
    prompt = text_ids(2, 11)
    plain = _decode(model, prompt)
    gdn_layers = sum(kind == "linear_attention" for kind in model.config.text_config.layer_types)
    assert len(conv_group_calls) == 5 * gdn_layers  # the prompt and 4 steps, each its convolutions apart

    DecodeStep.join_weights(model)
    conv_group_calls.clear()
    joined = _decode(model, prompt)
    assert len(conv_group_calls) == gdn_layers  # the prompt only: each decode step's are inside the product
    torch.testing.assert_close(joined, plain, rtol=1e-5, atol=1e-5)  # (the joined product sums in another order)
    with monkeypatch.context() as patch:  # the same joined product with the convolutions apart
        patch.setattr(gated_deltanet, "project_convolved", lambda *args, **kwargs: None)
        apart = _decode(model, prompt)
    assert torch.equal(joined, apart)  # on CPU the same float32 ops in the same order


def _first_gdn(model):
    layers = model.model.language_model.layers
    return next(layer.self_attn for layer in layers if layer.layer_type == "linear_attention")


def _hook_a_conv(model):
    _first_gdn(model).k_conv1d.register_forward_hook(lambda *args: None)


def _separate_conv_storage(model):
    conv = _first_gdn(model).v_conv1d
    conv.weight.data = conv.weight.data.clone()


@pytest.mark.parametrize("change", [_hook_a_conv, _separate_conv_storage])
def test_a_convolution_that_must_run_as_called_keeps_its_layer_off_the_joined_product(change, conv_group_calls):
    model = tiny_model()
    DecodeStep.join_weights(model)
    change(model)
    conv_group_calls.clear()
    _decode(model, text_ids(1, 6), steps=2)
    layer = _first_gdn(model)
    hooked = any(c._forward_hooks for c in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d))
    # the first Gated DeltaNet runs them apart at each step (as modules where one is hooked: no group call), the
    # others in the product; the prompt runs every layer's apart
    gdn_layers = sum(kind == "linear_attention" for kind in model.config.text_config.layer_types)
    assert len(conv_group_calls) == (gdn_layers - 1 if hooked else gdn_layers + 2)


def test_project_convolved_equals_the_projection_then_each_convolution():
    from infinitevl_hf.modeling.gated_deltanet import InfiniteVLShortConvolution
    from infinitevl_hf.modeling.joined_linear import project_convolved

    torch.manual_seed(0)
    linears = tuple(nn.Linear(8, n, bias=False) for n in (4, 4, 6, 3))
    convs = tuple(InfiniteVLShortConvolution(n, 4, bias=True) for n in (4, 4, 6))
    DecodeStep._joined(linears, "weight", True)
    DecodeStep._joined(convs, "weight", True)
    DecodeStep._joined(convs, "bias", True)
    x = torch.randn(2, 1, 8)
    states = tuple(torch.randn(2, n, 3) for n in (4, 4, 6))
    expected_states = tuple(s.clone() for s in states)
    with torch.no_grad():
        got = project_convolved(x, linears, convs, InfiniteVLShortConvolution, states)
        outputs = [m(x) for m in linears]
        expected = [conv(y, state=s, output_final_state=True, state_in_place=True)[0]
                    for conv, y, s in zip(convs, outputs, expected_states)] + outputs[3:]
        assert project_convolved(torch.randn(2, 3, 8), linears, convs, InfiniteVLShortConvolution, states) is None
        assert project_convolved(x.double(), linears, convs, InfiniteVLShortConvolution, states) is None
        assert project_convolved(x, linears, convs, InfiniteVLShortConvolution, (None,) * 3) is None
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    for s, e in zip(states, expected_states):
        torch.testing.assert_close(s, e)  # shifted in place, as each convolution shifts its own
    assert project_convolved(x, linears, convs, InfiniteVLShortConvolution, states) is None  # autograd on


def test_the_mlp_adds_the_residual_in_its_down_product_only_where_its_call_runs_as_defined(linear_calls):
    model = tiny_model()
    DecodeStep.join_weights(model)
    mlp = model.model.language_model.layers[0].mlp
    x, residual = torch.randn(1, 1, mlp.hidden_size), torch.randn(1, 1, mlp.hidden_size)
    with torch.no_grad():
        expected = residual + mlp(x)
        own = residual.clone()
        got = mlp.add_to(own, x, in_place=True)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(own, expected, rtol=0, atol=0)  # written over the residual
        assert not linear_calls
        seen = []
        mlp.register_forward_hook(lambda module, args, output: seen.append(output))
        hooked = mlp.add_to(residual.clone(), x, in_place=True)
    torch.testing.assert_close(hooked, expected, rtol=0, atol=0)
    torch.testing.assert_close(seen[0], expected - residual, rtol=1e-6, atol=1e-6)  # the hook saw the MLP's output
    leaf = residual.clone().requires_grad_()  # autograd: a new tensor, the residual untouched
    out = mlp.add_to(leaf, x, in_place=True)
    assert out is not leaf and torch.equal(leaf.detach(), residual)


def test_the_mlp_is_called_as_a_module_under_autograd_compiled_or_for_several_tokens():
    """Backward hooks and `module.compile()` live in the module's call: `add_to` takes the direct path only for one
    token outside autograd, and never for a compiled MLP."""
    model = tiny_model()
    DecodeStep.join_weights(model)
    mlp = model.model.language_model.layers[0].mlp
    grads = []
    mlp.register_full_backward_hook(lambda module, grad_in, grad_out: grads.append(grad_out[0].shape))
    hidden = mlp.hidden_size
    x = torch.randn(1, 1, hidden, requires_grad=True)
    out = mlp.add_to(torch.randn(1, 1, hidden), x, in_place=True)  # autograd on: the module's call, its hook runs
    out.sum().backward()
    assert len(grads) == 1
    mlp._backward_hooks.clear()
    with torch.no_grad():
        seen = []
        mlp._compiled_call_impl = lambda *args, **kwargs: (seen.append(1), type(mlp).forward(mlp, *args, **kwargs))[1]
        mlp.add_to(torch.randn(1, 1, hidden), torch.randn(1, 1, hidden))
        assert seen == [1]  # a compiled MLP runs its compiled call
        mlp._compiled_call_impl = None
        calls = []
        mlp.register_forward_pre_hook(lambda module, args: calls.append(1))
        mlp.add_to(torch.randn(1, 4, hidden), torch.randn(1, 4, hidden))  # a prompt: the module's call
        assert calls == [1]


def test_a_one_tap_convolution_decodes_through_the_torch_definition():
    """conv_size=1 keeps no past input: the kernels' fit checks refuse it, and the laid-out decode still runs."""
    from infinitevl_hf.modeling.ops.causal_conv1d import _step_layout_problem

    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    assert "one tap" in _step_layout_problem(meta(2, 1, 8), meta(8, 1), "silu", meta(2, 8, 0), None)
    model = tiny_model(conv_size=1)
    plain = _decode(model, text_ids(1, 6), steps=2)
    DecodeStep.join_weights(model)
    assert torch.equal(_decode(model, text_ids(1, 6), steps=2), plain)
