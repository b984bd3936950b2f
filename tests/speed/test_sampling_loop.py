"""generate()'s loop with the stop read one step late (`speed.sampling_loop`) returns transformers' loop's ids.

On a CPU the model keeps transformers' loop; these tests force the late-stop loop there (`samples_ahead` patched)
and compare the two on the same model and inputs: greedy and sampling, rows that finish early, a streamer, and the
number of forward calls each spends.
"""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import infinitevl_hf.modeling.modeling_infinitevl as modeling
from helpers import text_ids, tiny_model
from infinitevl_hf.speed.sampling_loop import LateStop, loop_problem

READY = dict(device_type="cuda", synced_gpus=False, is_assistant=False, return_dict_in_generate=False,
             cache_returned=False, auto_compile=False)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _generate(model, monkeypatch, ahead: bool, **kwargs):
    """generate() through the late-stop loop (ahead) or transformers' loop; also the number of forward calls."""
    monkeypatch.setattr(modeling, "samples_ahead", lambda *args, **kw: ahead)
    calls = []
    forward = type(model).forward

    def counted(self, *args, **kw):
        calls.append(1)
        return forward(self, *args, **kw)

    monkeypatch.setattr(type(model), "forward", counted)
    ran = []
    late = modeling.sample_ahead

    def spied(*args, **kw):
        ran.append(1)
        return late(*args, **kw)

    monkeypatch.setattr(modeling, "sample_ahead", spied)
    try:
        out = model.generate(**kwargs)
    finally:
        monkeypatch.undo()
    assert bool(ran) == ahead
    return out, len(calls)


def _padded_batch():
    ids = text_ids(3, 10, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    return dict(input_ids=ids, attention_mask=mask)


def test_greedy_ids_and_forward_calls_equal_transformers_loop(model, monkeypatch):
    inputs = dict(**_padded_batch(), max_new_tokens=9, do_sample=False)
    expected, expected_calls = _generate(model, monkeypatch, False, **inputs)
    got, calls = _generate(model, monkeypatch, True, **inputs)
    assert torch.equal(got, expected)
    assert calls == expected_calls == 9  # a length limit is known on the host: no step too many


def test_rows_that_finish_early_get_the_same_padding_and_one_extra_step_is_dropped(model, monkeypatch):
    base = dict(**_padded_batch(), max_new_tokens=12, do_sample=True, top_k=0, temperature=2.0, pad_token_id=0)
    torch.manual_seed(4)
    free, _ = _generate(model, monkeypatch, False, **base)
    new = free[:, 10:]
    # End tokens that the rows reach at different steps, all before the limit (a row's first one ends it).
    inputs = dict(base, eos_token_id=sorted({int(new[0, 1]), int(new[1, 4]), int(new[2, 7])}))
    torch.manual_seed(4)
    expected, expected_calls = _generate(model, monkeypatch, False, **inputs)
    torch.manual_seed(4)
    got, calls = _generate(model, monkeypatch, True, **inputs)
    assert torch.equal(got, expected)
    assert expected.shape[1] <= 10 + 8 and (expected[:, 10:] == 0).any()  # stopped early; finished rows padded
    assert got.is_contiguous()  # the dropped step leaves no strided view behind
    assert calls == expected_calls + 1  # the stop is read one step late


def test_sampling_draws_the_same_tokens(model, monkeypatch):
    inputs = dict(**_padded_batch(), max_new_tokens=8, do_sample=True, top_k=0, temperature=1.5)
    torch.manual_seed(11)
    expected, _ = _generate(model, monkeypatch, False, **inputs)
    torch.manual_seed(11)
    got, _ = _generate(model, monkeypatch, True, **inputs)
    assert torch.equal(got, expected)


class _Collect(BaseStreamer):
    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens.append(value.clone())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("stop_early", [False, True])
def test_a_streamer_gets_the_same_tokens(model, monkeypatch, stop_early):
    ids = text_ids(1, 9, seed=7)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    if stop_early:
        free, _ = _generate(model, monkeypatch, False, **inputs)
        inputs.update(eos_token_id=int(free[0, 9 + 4]), pad_token_id=0)
    streams = []
    for ahead in (False, True):
        streamer = _Collect()
        out, _ = _generate(model, monkeypatch, ahead, **inputs, streamer=streamer)
        assert streamer.ended
        streams.append((out, torch.cat([t.reshape(-1) for t in streamer.tokens])))
    (expected, expected_stream), (got, stream) = streams
    assert torch.equal(got, expected) and torch.equal(stream, expected_stream)


def test_late_stop_reads_each_flag_one_step_late():
    stop = LateStop(rows=2, device=torch.device("cpu"), max_length=100)
    running, done = torch.tensor([1, 0]), torch.tensor([0, 0])
    assert not stop(running, torch.zeros(2), 10)
    assert not stop(done, torch.zeros(2), 11)  # finished now, seen at the next step
    assert stop(running, torch.zeros(2), 12)
    assert stop.finish() == 1
    limited = LateStop(rows=1, device=torch.device("cpu"), max_length=11)
    assert not limited(torch.tensor([1]), torch.zeros(1), 10)
    assert limited(torch.tensor([0]), torch.zeros(1), 11)  # the limit stops on time, whatever the flag
    assert limited.finish() == 0


def test_the_loop_runs_only_where_it_can():
    assert loop_problem(**READY) is None


@pytest.mark.parametrize(
    "flags,words",
    [
        (dict(device_type="cpu"), "cpu"),
        (dict(synced_gpus=True), "synced_gpus"),
        (dict(is_assistant=True), "assisted"),
        (dict(return_dict_in_generate=True), "see the cache"),
        (dict(cache_returned=True), "see the cache"),
        (dict(planned=False), "without a cache"),
        (dict(auto_compile=True), "compiles"),
        (dict(available=False), "prefill"),
    ],
    ids=["cpu", "synced", "assistant", "return-dict", "cache-given", "unplanned", "auto-compile", "old-transformers"],
)
def test_each_reason_for_transformers_loop_is_named(flags, words):
    assert words in loop_problem(**{**READY, **flags})


def test_a_cpu_generate_keeps_transformers_loop(model, monkeypatch):
    ran = []
    monkeypatch.setattr(modeling, "sample_ahead", lambda *args, **kw: ran.append(1))
    ids = text_ids(1, 6)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert not ran
