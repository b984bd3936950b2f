"""The decoder layer's norms run inside the products after them at decode (the input norm in the mixer's joined
input projection, the post-attention add and norm in the MLP's gate/up product): the same values as the norms
called as modules, and taken only where the modules may be stood in for."""

import pytest
import torch

from helpers import text_ids, tiny_model
from infinitevl_hf.modeling import gated_deltanet, joined_linear, mlp as mlp_module
from infinitevl_hf.modeling.rms_norm import InfiniteVLRMSNorm
from infinitevl_hf.speed.decode_step import DecodeStep


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


@pytest.fixture
def norm_calls(monkeypatch):
    """Each call of a decoder norm as its own op: ("norm", rows) for `forward`, ("add", rows) for `add_then_norm`."""
    calls = []
    forward, add_then_norm = InfiniteVLRMSNorm.forward, InfiniteVLRMSNorm.add_then_norm

    def counted_forward(self, x):
        calls.append(("norm", x.shape[-2]))
        return forward(self, x)

    def counted_add(self, residual, delta):
        calls.append(("add", delta.shape[-2]))
        return add_then_norm(self, residual, delta)

    monkeypatch.setattr(InfiniteVLRMSNorm, "forward", counted_forward)
    monkeypatch.setattr(InfiniteVLRMSNorm, "add_then_norm", counted_add)
    return calls


def _apart(monkeypatch):
    """The same laid-out decode with every norm run as its own op."""
    monkeypatch.setattr(joined_linear, "norm_parameters", lambda norm: None)
    monkeypatch.setattr(mlp_module, "norm_parameters", lambda norm: None)


@pytest.mark.parametrize("batch", [1, 2])
def test_laid_out_decode_runs_its_norms_inside_the_products_with_the_same_values(norm_calls, monkeypatch, batch):
    model = tiny_model()
    prompt = text_ids(batch, 11)
    plain = _decode(model, prompt)
    layers = len(model.config.text_config.layer_types)
    # the prompt and each of 4 steps: per layer its input norm and the post-attention add + norm, then the final norm
    assert sorted(set(norm_calls)) == [("add", 1), ("add", 11), ("norm", 1), ("norm", 11)]
    assert len(norm_calls) == 5 * (2 * layers + 1)

    DecodeStep.join_weights(model)
    norm_calls.clear()
    fused = _decode(model, prompt)
    # the prompt as before; at decode only the final norm (before the head) is an op of its own
    assert norm_calls.count(("norm", 11)) == layers + 1 and norm_calls.count(("add", 11)) == layers
    assert [c for c in norm_calls if c[1] == 1] == [("norm", 1)] * 4
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)  # (the joined products sum in another order)
    with monkeypatch.context() as patch:
        _apart(patch)
        apart = _decode(model, prompt)
    assert torch.equal(fused, apart)  # on CPU the norm inside the product is the same float32 ops in the same order


def _first_layer(model, kind: str):
    return next(layer for layer in model.model.language_model.layers if layer.layer_type == kind)


@pytest.mark.parametrize("kind", ["linear_attention", "sliding_attention"])
def test_hooked_norms_and_mixers_are_called_as_modules(kind):
    """A norm with a hook runs as its module's call (the hook sees what it always saw); a mixer with a pre-hook
    gets the normed input it always got, not the norm to apply."""
    model = tiny_model()
    DecodeStep.join_weights(model)
    prompt = text_ids(1, 9)
    expected = _decode(model, prompt, steps=3)
    layer = _first_layer(model, kind)
    seen = {"input": [], "post": [], "mixer": []}
    layer.input_layernorm.register_forward_hook(lambda m, args, out: seen["input"].append((args[0], out)))
    layer.post_attention_layernorm.register_forward_hook(lambda m, args, out: seen["post"].append(args[0].shape))
    layer.self_attn.register_forward_pre_hook(lambda m, args, kwargs: seen["mixer"].append((args[0], kwargs)),
                                              with_kwargs=True)
    got = _decode(model, prompt, steps=3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(seen["input"]) == len(seen["post"]) == len(seen["mixer"]) == 4  # the prompt and 3 steps
    for (norm_in, norm_out), (mixer_in, kwargs) in zip(seen["input"], seen["mixer"]):
        assert mixer_in is norm_out and "input_norm" not in kwargs  # the hooked mixer is handed the normed input
        assert norm_in.shape == norm_out.shape


@pytest.mark.parametrize("kind", ["linear_attention", "sliding_attention"])
@pytest.mark.parametrize("length", [1, 6])
def test_a_mixer_handed_its_input_norm_equals_the_mixer_on_the_normed_input(kind, length):
    model = tiny_model()
    DecodeStep.join_weights(model)
    layer = _first_layer(model, kind)
    config = model.config.text_config
    hidden = torch.randn(1, length, config.hidden_size)
    positions = torch.arange(length)[None, None].expand(3, 1, -1)
    rotary = model.model.language_model.rotary_emb(hidden, positions)

    def run(**kwargs):
        args = (hidden,) if kind == "linear_attention" else (hidden if "input_norm" in kwargs else None, rotary)
        if "input_norm" not in kwargs:
            args = (layer.input_layernorm(hidden), *args[1:])
        out = layer.self_attn(*args, **kwargs)
        return out if kind == "linear_attention" else out[0]

    with torch.no_grad():
        torch.testing.assert_close(run(input_norm=layer.input_layernorm), run(), rtol=1e-6, atol=1e-6)


def test_the_mlp_adds_and_norms_inside_its_gate_product_only_where_it_runs_as_defined(norm_calls):
    model = tiny_model()
    DecodeStep.join_weights(model)
    layer = model.model.language_model.layers[0]
    mlp, norm = layer.mlp, layer.post_attention_layernorm
    hidden = mlp.hidden_size
    residual, delta = torch.randn(1, 1, hidden), torch.randn(1, 1, hidden)
    with torch.no_grad():
        summed = residual + delta
        expected = summed + mlp(norm(summed))
        norm_calls.clear()
        torch.testing.assert_close(mlp.add_normed_to(residual, delta, norm), expected, rtol=0, atol=0)
        assert norm_calls == []  # the add and the norm ran inside the gate/up product
        seen = []
        handle = norm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        torch.testing.assert_close(mlp.add_normed_to(residual, delta, norm), expected, rtol=0, atol=0)
        torch.testing.assert_close(seen[0], summed, rtol=0, atol=0)  # a hooked norm is called on the sum
        handle.remove()
        several = torch.randn(1, 5, hidden), torch.randn(1, 5, hidden)
        norm_calls.clear()
        torch.testing.assert_close(mlp.add_normed_to(*several, norm), (several[0] + several[1]) + mlp(norm(sum(several))))
        assert norm_calls[0] == ("add", 5)  # a prompt: the add and the norm as one op, then the MLP
    leaf = residual.clone().requires_grad_()  # autograd: the module path, gradients flow to both summands
    mlp.add_normed_to(leaf, delta, norm).sum().backward()
    assert leaf.grad is not None and torch.equal(leaf.detach(), residual)


@pytest.mark.parametrize("kind", ["linear_attention", "sliding_attention"])
def test_a_hooked_norm_before_a_mixer_called_as_defined_is_called_as_its_module(kind):
    """Only the norm has a hook: the mixer still applies it (handed the norm), and does so by calling it."""
    model = tiny_model()
    DecodeStep.join_weights(model)
    prompt = text_ids(2, 9)
    expected = _decode(model, prompt, steps=3)
    layer = _first_layer(model, kind)
    seen = []
    layer.input_layernorm.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, out.shape)))
    got = _decode(model, prompt, steps=3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    hidden = model.config.text_config.hidden_size
    assert seen == [((2, 9, hidden), (2, 9, hidden))] + [((2, 1, hidden), (2, 1, hidden))] * 3


@pytest.mark.parametrize("kind", ["linear_attention", "sliding_attention"])
def test_backward_hooks_see_the_gradients_of_the_modules_own_inputs(kind):
    """Under autograd nothing is stood in for: a full backward hook on the mixer gets the gradient of the normed
    input it was called on, and one on the post-attention norm is called."""
    model = tiny_model()
    layer = _first_layer(model, kind)
    normed, mixer_grads, post_norm_grads = [], [], []

    def keep(module, args, out):
        out.retain_grad()
        normed.append(out)

    layer.input_layernorm.register_forward_hook(keep)
    layer.self_attn.register_full_backward_hook(lambda m, grad_in, grad_out: mixer_grads.append(grad_in[0]))
    layer.post_attention_layernorm.register_full_backward_hook(lambda m, gi, go: post_norm_grads.append(gi[0]))
    model(input_ids=text_ids(1, 6)).logits.float().square().mean().backward()
    assert len(mixer_grads) == len(normed) == 1 and len(post_norm_grads) == 1
    torch.testing.assert_close(mixer_grads[0], normed[0].grad, rtol=0, atol=0)


def test_a_product_with_a_norm_refuses_a_residual():
    weight = torch.randn(4, 8)
    with pytest.raises(ValueError, match="takes no residual"):
        joined_linear._one_token_product(torch.randn(1, 1, 8), weight, None, residual=torch.randn(1, 1, 4),
                                         norm=(torch.ones(8), 1e-6))


def test_the_gated_output_norm_runs_inside_the_output_product_at_decode(monkeypatch):
    """A Gated DeltaNet's output norm and its output projection are one op at decode (`gated_rms_norm_matvec`),
    with the values of the two modules called; a hooked norm is called as its module."""
    from infinitevl_hf.modeling.gated_deltanet import InfiniteVLGatedRMSNorm

    model = tiny_model()
    DecodeStep.join_weights(model)
    prompt = text_ids(2, 7)
    calls = []
    forward = InfiniteVLGatedRMSNorm.forward

    def counted(self, x, gate=None):
        calls.append(x.shape[1])
        return forward(self, x, gate)

    monkeypatch.setattr(InfiniteVLGatedRMSNorm, "forward", counted)
    fused = _decode(model, prompt, steps=3)
    gdn_layers = model.config.text_config.layer_types.count("linear_attention")
    assert calls == [7] * gdn_layers  # the prompt only: at decode the norm ran inside the product
    with monkeypatch.context() as patch:
        patch.setattr(gated_deltanet, "apply_gated_norm_linear", lambda *args: None)
        calls.clear()
        apart = _decode(model, prompt, steps=3)
        assert calls == [7] * gdn_layers + [1] * (3 * gdn_layers)
    assert torch.equal(fused, apart)  # on CPU both are the same torch ops
    layer = _first_layer(model, "linear_attention")
    seen = []
    layer.self_attn.o_norm.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    calls.clear()
    torch.testing.assert_close(_decode(model, prompt, steps=3), fused, rtol=1e-6, atol=1e-6)
    assert seen == [7, 1, 1, 1]
