"""Decode graphs kept on the model: wiring, reuse and binding, on CPU with the eager decode step standing in for
the CUDA graph (the same object `generate()` replays on CUDA, minus the capture)."""

import pytest
import torch

from helpers import image_inputs, text_ids, tiny_model
from infinitevl_hf import InfiniteVLCache
from infinitevl_hf.modeling.compat import CACHE_KWARG
from infinitevl_hf.speed.decode_step import DecodeStep
from infinitevl_hf.speed import DecodeGraphs, DecodePlan, decode_graphs_of
from infinitevl_hf.speed import generation as speed_generation


def _weights(model):
    return tuple(p.data_ptr() for p in model.parameters())


class EagerStep:
    """What a captured graph replays, run eagerly: the fused step (joined projections, as on CUDA) over the graph's
    own cache. Like a graph it must find the cache's buffers and the weights where they were when it was built."""

    built = 0

    def __init__(self, model, cache):
        EagerStep.built += 1
        self.fused = DecodeStep(model, cache, concat_projections=True)
        self.model, self.cache = model, cache
        self.addresses, self.weights = cache.buffer_addresses(), _weights(model)

    def step(self, input_ids):
        assert self.cache.buffer_addresses() == self.addresses, "the cache's buffers moved under a captured step"
        assert _weights(self.model) == self.weights, "the weights moved under a captured step"
        return self.fused(input_ids)


WINDOW = 64  # the smallest captured prompt length: prompts up to one window go through captured prompts


def reference_model():
    return tiny_model(sliding_window=WINDOW)


def eager_prompt(step, cache):
    """What a captured prompt replays, run eagerly; like a graph it must find the buffers and weights in place."""
    addresses, weights = cache.buffer_addresses(), _weights(step.model)

    def replay():
        assert cache.buffer_addresses() == addresses, "the cache's buffers moved under a captured prompt"
        assert _weights(step.model) == weights, "the weights moved under a captured prompt"
        return step(cache)

    return replay


@pytest.fixture
def graph_model(monkeypatch):
    """A tiny model whose generate() takes the graph path on CPU, through the eager stand-ins."""
    model = reference_model()
    model.__dict__["_decode_graphs"] = DecodeGraphs(capture_decode=EagerStep, capture_prompt=eager_prompt)
    module_path = speed_generation.plan_for_model

    def plan(some_model, *args, **kwargs):  # the reference models of a test keep the module path
        return DecodePlan("graph") if some_model is model else module_path(some_model, *args, **kwargs)

    monkeypatch.setattr(speed_generation, "plan_for_model", plan)
    return model


def _generate(model, **inputs):
    out = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    _generate.logits = torch.stack(out.logits, 1)  # greedy tokens of a tiny random model repeat: compare logits too
    return out.sequences, out[CACHE_KWARG] if CACHE_KWARG in out else out.past_key_values


def _same(tokens, logits, expected_tokens, expected_logits):
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length", [20, 60, 90], ids=["short", "wraps-the-ring", "longer-than-a-window"])
def test_generate_through_the_graph_path_gives_the_module_path_tokens(graph_model, length):
    reference = reference_model()
    tokens, cache = _generate(graph_model, input_ids=text_ids(1, length))
    logits = _generate.logits
    expected, expected_cache = _generate(reference, input_ids=text_ids(1, length))
    _same(tokens, logits, expected, _generate.logits)
    # the window the cache holds, read back in token order (what saving a cache does), is the module path's
    for mine, theirs in zip(cache.fork().to_dynamic().layers, expected_cache.to_dynamic().layers):
        if hasattr(theirs, "keys"):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
    graphs = decode_graphs_of(graph_model)
    assert graphs.replays == 11  # every step after the first token was a replay
    assert graphs.prompt_replays == (1 if length <= WINDOW else 0)  # a prompt over one window: the module path


def test_an_image_prompt_through_the_captured_prompt_gives_the_module_path_tokens(graph_model):
    ids, pixels, grid = image_inputs(prefix=9, suffix=14)
    inputs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    tokens, _ = _generate(graph_model, **inputs)
    logits = _generate.logits
    _same(tokens, logits, _generate(reference_model(), **inputs)[0], _generate.logits)
    assert decode_graphs_of(graph_model).prompt_replays == 1


def test_a_second_generate_captures_nothing(graph_model):
    ids = text_ids(1, 20)
    _generate(graph_model, input_ids=ids)
    graphs = decode_graphs_of(graph_model)
    captures, built = graphs.captures, EagerStep.built
    second = text_ids(1, 9, seed=5)
    tokens, _ = _generate(graph_model, input_ids=second)
    assert graphs.captures == captures == 2 and EagerStep.built == built  # its prompt and its decode step
    logits = _generate.logits
    _same(tokens, logits, _generate(reference_model(), input_ids=second)[0], _generate.logits)  # its own state, bound in


def test_a_cache_returned_earlier_keeps_its_memory_when_another_call_binds(graph_model):
    reference = reference_model()
    first_tokens, first_cache = _generate(graph_model, input_ids=text_ids(1, 20))
    kept = first_cache.fork()
    _generate(graph_model, input_ids=text_ids(1, 15, seed=7))  # binds the same graph
    more = text_ids(1, 4, seed=8)
    with torch.no_grad():
        after = graph_model(input_ids=more, use_cache=True, **{CACHE_KWARG: first_cache}).logits
        expected = reference(input_ids=more, use_cache=True, **{CACHE_KWARG: kept}).logits
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_rows_equal_the_rows_alone_through_the_graph_path(graph_model):
    short, long = text_ids(1, 7, seed=3), text_ids(1, 11, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1),
                      torch.ones(1, 11, dtype=torch.long)])
    both, _ = _generate(graph_model, input_ids=batch, attention_mask=mask)
    both_logits = _generate.logits
    for row, ids in enumerate((short, long)):
        alone, _ = _generate(graph_model, input_ids=ids)
        _same(both[row, -alone.shape[1]:], both_logits[row], alone[0], _generate.logits[0])
    assert decode_graphs_of(graph_model).captures == 4  # a prompt and a decode step per batch size


def test_moved_weights_are_captured_again(graph_model):
    _generate(graph_model, input_ids=text_ids(1, 10))
    for p in graph_model.parameters():  # e.g. a reload or .to() that gives the weights new storage
        p.data = p.data.clone()
    tokens, _ = _generate(graph_model, input_ids=text_ids(1, 10))
    logits = _generate.logits
    assert decode_graphs_of(graph_model).captures == 4  # prompt and decode step, twice
    _same(tokens, logits, _generate(reference_model(), input_ids=text_ids(1, 10))[0], _generate.logits)


def test_the_graph_path_serves_only_the_cache_its_generate_call_planned():
    model = reference_model()
    cache = InfiniteVLCache(model.config)
    with torch.no_grad():
        model(input_ids=text_ids(1, 6), use_cache=True, **{CACHE_KWARG: cache})
    assert speed_generation.fast_forward(model, cache, input_ids=text_ids(1, 1)) is None  # outside generate()
    assert not cache.is_static


def test_generate_decodes_with_the_cache_when_the_config_says_use_cache_false():
    model = reference_model()
    model.config.use_cache = False  # as in the released config (a training setting)
    model.generation_config.use_cache = False
    from infinitevl_hf.modeling.modeling_infinitevl import generation_uses_cache

    generation_uses_cache(model)
    lengths = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((kwargs.get("inputs_embeds") if kwargs.get("input_ids") is None
                                                     else kwargs["input_ids"]).shape[1]), with_kwargs=True)
    model.generate(text_ids(1, 6), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert lengths == [6, 1, 1, 1]
    lengths.clear()
    model.generate(text_ids(1, 6), max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=False)
    assert lengths == [6, 7, 8]  # asked for: every step re-runs the sequence


def test_a_loaded_checkpoint_whose_config_says_use_cache_false_generates_with_the_cache(tmp_path):
    from infinitevl_hf import InfiniteVLForConditionalGeneration

    model = reference_model()
    model.config.use_cache = False
    model.generation_config.use_cache = False
    model.save_pretrained(tmp_path)
    loaded = InfiniteVLForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.generation_config.use_cache is True


def test_warmup_captures_what_a_later_call_of_that_batch_size_needs(graph_model):
    graph_model.warmup(batch_sizes=(1,), prompt_tokens=40)
    graphs = decode_graphs_of(graph_model)
    captures = graphs.captures
    assert captures == 2  # the prompt and the decode step of batch 1
    _generate(graph_model, input_ids=text_ids(1, 33))  # the same captured prompt length (64)
    assert graphs.captures == captures


def test_concurrent_generate_calls_each_get_their_own_answer(graph_model):
    import threading

    prompts = [text_ids(1, 20 + 5 * i, seed=30 + i) for i in range(3)]
    expected = [_generate(reference_model(), input_ids=p)[0] for p in prompts]
    got = [None] * len(prompts)

    def run(i):
        got[i] = graph_model.generate(input_ids=prompts[i], max_new_tokens=12, min_new_tokens=12, do_sample=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for mine, theirs in zip(got, expected):
        assert torch.equal(mine, theirs)


def _generate_then_clear(graph_model):
    """A generate() through the graphs, a fork of the cache it returned, then clear(): cache, fork and graphs."""
    _, cache = _generate(graph_model, input_ids=text_ids(1, 20))
    kept = cache.fork()
    graphs = decode_graphs_of(graph_model)
    graphs.clear()
    return cache, kept, graphs


def test_clear_frees_the_graphs(graph_model):
    _, _, graphs = _generate_then_clear(graph_model)
    assert not graphs.slots


def test_clear_leaves_returned_caches_valid(graph_model):
    cache, kept, _ = _generate_then_clear(graph_model)
    more = text_ids(1, 3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(graph_model(input_ids=more, use_cache=True, **{CACHE_KWARG: cache}).logits,
                                   reference_model()(input_ids=more, use_cache=True, **{CACHE_KWARG: kept}).logits,
                                   rtol=1e-5, atol=1e-5)


def test_the_captured_paths_refuse_what_the_module_path_refuses(graph_model):
    from helpers import IMAGE_TOKEN

    ids = text_ids(1, 20)
    ids[0, 5] = IMAGE_TOKEN  # a placeholder without pixels
    with pytest.raises(ValueError, match="placeholder"):
        graph_model.generate(input_ids=ids, max_new_tokens=2)
    other = InfiniteVLCache(tiny_model(sliding_window=16).config)  # built for another window
    with pytest.raises(ValueError, match="another model config"):
        graph_model.generate(input_ids=text_ids(1, 20), max_new_tokens=2, **{CACHE_KWARG: other})
    assert decode_graphs_of(graph_model).prompt_replays == 0


def test_a_fork_whose_counter_restarts_continues_the_stream_it_holds(graph_model):
    """What StreamingSession.ask does: a fork of a stream's cache with `seen_tokens` at 0, so that generate() takes
    the question as the prompt; decoding over rings must continue the windows the fork holds."""
    stream, question = text_ids(1, 40, seed=3), text_ids(1, 8, seed=4)

    def answer(model):
        cache = InfiniteVLCache(model.config)
        with torch.no_grad():
            model(input_ids=stream, use_cache=True, **{CACHE_KWARG: cache})
        fork = cache.fork()
        fork.seen_tokens = 0
        _generate(model, input_ids=question, attention_mask=torch.ones_like(question), **{CACHE_KWARG: fork})
        return _generate.logits

    reference = reference_model()
    one_prompt, _ = _generate(reference, input_ids=torch.cat([stream, question], 1))
    expected = _generate.logits
    torch.testing.assert_close(answer(graph_model), expected, rtol=1e-4, atol=1e-5)
    assert decode_graphs_of(graph_model).replays == 11 and decode_graphs_of(graph_model).prompt_replays == 0


def test_the_cache_generate_returns_holds_its_own_memory(graph_model):
    _, cache = _generate(graph_model, input_ids=text_ids(1, 20))
    graphs = decode_graphs_of(graph_model)
    assert graphs.replays == 11
    assert not any(slot.holds(cache) for slot in graphs.slots.values())
    assert cache.buffer_addresses() != next(iter(graphs.slots.values())).cache.buffer_addresses()


@pytest.mark.parametrize("returned", ["plain", "return_dict", "cache_passed_in"])
def test_only_a_cache_the_caller_can_reach_gets_its_own_copy(graph_model, monkeypatch, returned):
    """Copying the slot's buffers out costs host time at the end of every call: a cache that generate() made for
    itself and does not return is let go instead; one passed in or returned keeps a copy of its own."""
    copies = []
    own_buffers = InfiniteVLCache.own_buffers
    monkeypatch.setattr(InfiniteVLCache, "own_buffers", lambda cache: copies.append(cache) or own_buffers(cache))
    kwargs = dict(max_new_tokens=4, do_sample=False)
    given = InfiniteVLCache(graph_model.config) if returned == "cache_passed_in" else None
    if given is not None:
        kwargs[CACHE_KWARG] = given
    out = graph_model.generate(input_ids=text_ids(1, 20), return_dict_in_generate=returned == "return_dict", **kwargs)
    slot = next(iter(decode_graphs_of(graph_model).slots.values()))
    assert decode_graphs_of(graph_model).replays == 3
    if returned == "plain":
        assert copies == [] and slot.owner is None
    else:
        cache = given if given is not None else (out[CACHE_KWARG] if CACHE_KWARG in out else out.past_key_values)
        assert copies == [cache] and not slot.holds(cache)
        assert cache.buffer_addresses() != slot.cache.buffer_addresses()


def _state(cache):
    return [t.clone() for t in cache._state_tensors()]


def test_a_cache_a_custom_generate_keeps_is_not_overwritten_by_the_next_call(graph_model):
    """A `custom_generate` function may hand the cache back whatever return_dict_in_generate says: it gets its copy."""
    from transformers import GenerationMixin

    def decode(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
               synced_gpus=False, streamer=None, **model_kwargs):
        tokens = GenerationMixin._sample(model, input_ids, logits_processor=logits_processor,
                                         stopping_criteria=stopping_criteria, generation_config=generation_config,
                                         synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        return tokens, model_kwargs[CACHE_KWARG]

    _, cache = graph_model.generate(input_ids=text_ids(1, 20), max_new_tokens=4, do_sample=False,
                                    custom_generate=decode)
    before = _state(cache)
    graph_model.generate(input_ids=text_ids(1, 30, seed=1), max_new_tokens=4, do_sample=False)
    assert decode_graphs_of(graph_model).replays == 6
    assert all(torch.equal(a, b) for a, b in zip(before, _state(cache)))


def test_return_dict_in_the_models_generation_config_counts_as_returning_the_cache(graph_model):
    graph_model.generation_config.return_dict_in_generate = True
    out = graph_model.generate(input_ids=text_ids(1, 20), max_new_tokens=4, do_sample=False)
    cache = out[CACHE_KWARG] if CACHE_KWARG in out else out.past_key_values
    slot = next(iter(decode_graphs_of(graph_model).slots.values()))
    assert not slot.holds(cache) and cache.buffer_addresses() != slot.cache.buffer_addresses()


def test_interleaved_first_calls_capture_the_decode_step_once(graph_model):
    """Two calls whose first steps interleave (threads of a server without warmup(); here a logits processor
    that calls generate()): the outer call's weight record predates the layout the inner call's slot made, which
    must not make the slot look moved at every step of the outer call."""
    from transformers import LogitsProcessorList

    inner = {"running": False}

    def processor(input_ids, scores):
        if not inner["running"]:
            inner["running"] = True
            graph_model.generate(input_ids=text_ids(1, 20, seed=3), max_new_tokens=2, do_sample=False)
            inner["running"] = False
        return scores

    built = EagerStep.built
    graph_model.generate(input_ids=text_ids(1, 20), max_new_tokens=8, do_sample=False,
                         logits_processor=LogitsProcessorList([processor]))
    assert EagerStep.built - built == 1


def test_a_first_capture_leaves_the_weights_where_later_calls_find_them(graph_model):
    """The joined step lays the weights out once, before anything is recorded: the second call captures nothing."""
    graph_model.warmup(batch_sizes=(1,), prompt_tokens=30)
    captures = decode_graphs_of(graph_model).captures
    _generate(graph_model, input_ids=text_ids(1, 25))
    assert decode_graphs_of(graph_model).captures == captures


@pytest.fixture
def cuda_vision_mlp(monkeypatch):
    """The vision MLPs run their padded CUDA forward on CPU too (which re-lays their weights on first use)."""
    from infinitevl_hf.speed.vision.mlp import InfiniteVLVisionMLP

    monkeypatch.setattr(InfiniteVLVisionMLP, "forward", InfiniteVLVisionMLP.padded_forward)


def test_a_second_image_generate_captures_nothing(graph_model, cuda_vision_mlp):
    """The vision MLP's padded weights are laid out before the graphs record where the weights are, not during the
    first captured prompt (which made the second call drop every graph and capture them again)."""
    assert graph_model.model.visual.blocks[0].mlp.pads()
    ids, pixels, grid = image_inputs(prefix=9, suffix=14)
    _generate(graph_model, input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    captures = decode_graphs_of(graph_model).captures
    ids, pixels, grid = image_inputs(prefix=9, suffix=14, seed=7)
    _generate(graph_model, input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    assert decode_graphs_of(graph_model).captures == captures == 2


def test_a_graph_slot_records_the_vision_weights_where_their_padded_forward_reads_them(graph_model):
    from infinitevl_hf.speed import GraphSlot

    slot = GraphSlot(graph_model, 1, torch.float32, torch.device("cpu"))
    mlp = graph_model.model.visual.blocks[0].mlp
    with torch.no_grad():
        mlp.padded_forward(torch.randn(5, mlp.gate_proj.in_features))
    assert slot.valid_for(graph_model)


def test_beam_search_through_the_graph_path_gives_the_module_path_sequences(graph_model):
    ids = text_ids(1, 20)
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    assert torch.equal(graph_model.generate(ids, **kwargs), reference_model().generate(ids, **kwargs))
    assert decode_graphs_of(graph_model).replays == 7


def _bounded_to_one_slot_of_one_prompt(graph_model):
    """Graphs limited to one slot of one prompt after three calls that each want another; the first call's tokens."""
    graphs = decode_graphs_of(graph_model)
    graphs.MAX_SLOTS, graphs.MAX_PROMPTS_PER_SLOT = 1, 1
    first, cache = _generate(graph_model, input_ids=text_ids(1, 20))
    _generate(graph_model, input_ids=text_ids(2, 20, seed=3))  # another batch size takes the only slot
    _generate(graph_model, input_ids=text_ids(2, 100, seed=4)[:, :60])  # another prompt length of that slot
    return graphs, first


def test_slots_are_bounded(graph_model):
    graphs, _ = _bounded_to_one_slot_of_one_prompt(graph_model)
    assert len(graphs.slots) == 1


def test_prompts_per_slot_are_bounded(graph_model):
    graphs, _ = _bounded_to_one_slot_of_one_prompt(graph_model)
    assert all(len(slot.prompts) == 1 for slot in graphs.slots.values())


def test_captured_prompts_are_bounded_by_their_tokens(graph_model):
    """Rows x captured length, summed over a slot's prompts (what their activation memory grows with): with room
    for one 64-token prompt, a second shape of that length evicts the first, though the count bound has room."""
    graphs = decode_graphs_of(graph_model)
    graphs.MAX_PROMPT_TOKENS_PER_SLOT = 64
    _generate(graph_model, input_ids=text_ids(1, 20))
    ids, pixels, grid = image_inputs(prefix=9, suffix=14)
    _generate(graph_model, input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    (slot,) = graphs.slots.values()
    assert [shape.grids for shape in slot.prompts] == [tuple(tuple(g) for g in grid.tolist())]
    assert graphs.prompt_replays == 2


def test_an_evicted_slot_gives_the_same_tokens_again(graph_model):
    _, first = _bounded_to_one_slot_of_one_prompt(graph_model)
    assert torch.equal(_generate(graph_model, input_ids=text_ids(1, 20))[0], first)


def test_models_with_full_attention_layers_decode_dynamic():
    from infinitevl_hf.speed import plan_for_model

    model = tiny_model(layer_types=["sliding_attention", "linear_attention", "full_attention", "linear_attention",
                                    "sliding_attention"])
    plan = plan_for_model(model, torch.device("cuda"))
    assert plan.path == "dynamic" and "full-attention" in plan.reason


class EagerModules:
    """What the captured graph of the module path replays (models the compiled step cannot read), run eagerly over
    the graph's own cache; like a graph it must find the cache's buffers and the weights in place."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.addresses, self.weights = cache.buffer_addresses(), _weights(model)

    def step(self, input_ids):
        assert self.cache.buffer_addresses() == self.addresses, "the cache's buffers moved under a captured step"
        assert _weights(self.model) == self.weights, "the weights moved under a captured step"
        with torch.no_grad():
            return self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: self.cache}).logits


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    return wrapped.base_model.model.eval()


@pytest.fixture
def lora_graph_model(monkeypatch):
    """A tiny LoRA model whose generate() replays its modules through the eager stand-in of the module graph."""
    model = _lora(reference_model())
    model.__dict__["_decode_graphs"] = DecodeGraphs(capture_decode=EagerModules, capture_prompt=eager_prompt)
    module_path = speed_generation.plan_for_model

    def plan(some_model, *args, **kwargs):
        if some_model is model:
            return DecodePlan("graph", DecodeStep.unsupported(model), step="modules")
        return module_path(some_model, *args, **kwargs)

    monkeypatch.setattr(speed_generation, "plan_for_model", plan)
    return model


@pytest.mark.parametrize("length", [20, 90], ids=["short", "longer-than-a-window"])
def test_a_lora_model_through_its_captured_modules_gives_the_module_path_tokens(lora_graph_model, length):
    tokens, _ = _generate(lora_graph_model, input_ids=text_ids(1, length))
    logits = _generate.logits
    expected, _ = _generate(_lora(reference_model()), input_ids=text_ids(1, length))
    _same(tokens, logits, expected, _generate.logits)
    assert decode_graphs_of(lora_graph_model).replays == 11


def test_the_default_capture_records_the_module_path_for_a_model_the_compiled_step_cannot_read(monkeypatch):
    """A LoRA model: its modules captured as they are; else the decode step over the package's kernels, not
    compiled at one row or more (with more, cuBLAS's products sit between the kernels)."""
    from types import SimpleNamespace

    from infinitevl_hf.speed import decode_graphs, graph_capture

    built = []
    monkeypatch.setattr(graph_capture, "CUDAGraphDecoder", lambda model, cache, **kwargs: built.append(kwargs))
    one, two = SimpleNamespace(batch_rows=1), SimpleNamespace(batch_rows=2)
    decode_graphs.capture_decode_step(_lora(reference_model()), one)
    decode_graphs.capture_decode_step(reference_model(), one)
    decode_graphs.capture_decode_step(reference_model(), two)
    assert [(kwargs["compile"], kwargs["triton_matvec"]) for kwargs in built] == [(False, False), (False, True),
                                                                                   (False, True)]


def test_the_weight_record_lists_every_parameter_in_order():
    from infinitevl_hf.speed.model_walk import weight_addresses as _weight_addresses

    model = _lora(reference_model())
    assert _weight_addresses(model) == tuple((p.data_ptr(), p.dtype) for p in model.parameters())


def test_the_module_walk_gives_named_modules_order():
    from infinitevl_hf.speed.decode_step import preorder_modules

    model = _lora(reference_model())
    assert [id(m) for m in preorder_modules(model)] == [id(m) for _, m in model.named_modules()]
    decoder = model.model.language_model  # a subtree walked already is spliced in, in the same order
    spliced = preorder_modules(model, {id(decoder): preorder_modules(decoder)})
    assert [id(m) for m in spliced] == [id(m) for _, m in model.named_modules()]
    model.model.visual.shared = decoder.layers[0].mlp  # a decoder module also reachable before the decoder
    decoder.layers[1].shared = model.model.visual.blocks[0]  # and a vision module inside it
    spliced = preorder_modules(model, {id(decoder): preorder_modules(decoder)})
    assert [id(m) for m in spliced] == [id(m) for _, m in model.named_modules()]


def test_moved_torchao_weights_are_seen_as_moved():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from infinitevl_hf.speed.model_walk import weight_addresses as _weight_addresses

    model = reference_model()
    quantize_(model.model.language_model, Int8WeightOnlyConfig())
    before = _weight_addresses(model)

    def flat(addresses):
        return [addresses] if isinstance(addresses, int) else [a for inner in addresses for a in flat(inner)]

    assert all(address != 0 for addresses, _ in before for address in flat(addresses))  # inner tensors, not 0
    assert any(isinstance(addresses, tuple) for addresses, _ in before)  # the quantized ones, through their parts
    up = model.model.language_model.layers[1].mlp.up_proj
    up.weight = torch.nn.Parameter(up.weight.detach().clone(), requires_grad=False)  # e.g. a reload
    assert _weight_addresses(model) != before


def _failing_capture(*args, **kwargs):
    raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture
def failing_lora_model(lora_graph_model):
    lora_graph_model.__dict__["_decode_graphs"] = DecodeGraphs(capture_decode=_failing_capture,
                                                               capture_prompt=_failing_capture)
    return lora_graph_model


def test_a_module_capture_that_fails_gives_the_module_path_tokens(failing_lora_model):
    tokens, _ = _generate(failing_lora_model, input_ids=text_ids(1, 20))
    logits = _generate.logits
    expected, _ = _generate(_lora(reference_model()), input_ids=text_ids(1, 20))
    _same(tokens, logits, expected, _generate.logits)


def test_a_module_capture_that_fails_is_not_tried_again(failing_lora_model, monkeypatch):
    from infinitevl_hf.speed import plan as speed_plan

    _generate(failing_lora_model, input_ids=text_ids(1, 20))
    monkeypatch.undo()  # the real planner again: it must remember the failure
    plan = speed_generation.plan_for_model(failing_lora_model, torch.device("cuda"))
    assert isinstance(plan, speed_plan.DecodePlan) and plan.path == "static" and "failed" in plan.reason


class _FailingReplay:
    def __init__(self, model, cache):
        pass

    def step(self, input_ids):
        raise RuntimeError("an error while replaying")


def test_an_error_in_a_replay_is_raised_not_taken_for_a_failed_capture(lora_graph_model):
    """Only a capture that failed (nothing ran) may fall back: a replay has moved the state on."""
    lora_graph_model.__dict__["_decode_graphs"] = DecodeGraphs(capture_decode=_FailingReplay, capture_prompt=eager_prompt)
    with pytest.raises(RuntimeError, match="while replaying"):
        _generate(lora_graph_model, input_ids=text_ids(1, 20))
    assert speed_generation._CAPTURE_FAILED not in lora_graph_model.__dict__


def test_a_module_capture_that_fails_says_why(failing_lora_model, caplog):
    import logging

    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="infinitevl_hf.speed.generation"):
        _generate(failing_lora_model, input_ids=text_ids(1, 20))
    assert any("capturing its modules in a CUDA graph failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("padded", [False, True], ids=["bucket-length", "left-padded"])
def test_a_captured_prompt_attends_to_its_own_keys_not_the_empty_window(graph_model, monkeypatch, padded):
    """A captured prompt starts from empty rings: each attention layer attends to the prompt's own keys only, not to
    the window of empty slots before them, with the values of a prompt that reads the whole ring."""
    from infinitevl_hf.modeling import attention as attention_module
    from infinitevl_hf.modeling.cache import InfiniteVLCache as Cache

    keys_seen = []
    attend = attention_module.attend

    def recorded(module, query, seen, *args, **kwargs):
        if query.shape[2] > 1:
            keys_seen.append(seen.keys.shape[2])
        return attend(module, query, seen, *args, **kwargs)

    monkeypatch.setattr(attention_module, "attend", recorded)
    ids = text_ids(1, 50 if padded else 64)  # laid into the 64-token bucket with 14 pads, or exactly
    tokens, _ = _generate(graph_model, input_ids=ids)
    logits = _generate.logits
    layers = graph_model.config.text_config.layer_types.count("sliding_attention")
    assert keys_seen == [64] * layers  # the bucket's own keys, not the 64-slot ring before them as well
    start_fresh = Cache.start_fresh_

    def fresh_but_unknown(self, start):
        start_fresh(self, start)
        for layer in self.layers:
            if hasattr(layer, "empty"):
                layer.empty = False  # as if nobody knew: the prompt reads and masks the empty ring

    monkeypatch.setattr(Cache, "start_fresh_", fresh_but_unknown)
    decode_graphs_of(graph_model).clear()
    keys_seen.clear()
    whole_ring = _generate(graph_model, input_ids=ids)
    assert keys_seen == [64 + WINDOW] * layers
    _same(tokens, logits, whole_ring[0], _generate.logits)
