"""`generate()`'s greedy / sampling loop with the host one step ahead of the GPU (CUDA).

transformers' loop reads, after every token, whether all rows have finished (`unfinished.max() == 0`). On CUDA
that read waits for the GPU to finish the step, so the GPU idles while the host runs the loop's Python and
launches the next step: 0.2-0.4 ms a token next to a captured step of 2.5 ms. transformers reads that answer one
step late on Apple GPUs only (`DeferredStopCheck`). `sample_ahead` is the same loop, built from transformers' own
pieces (prefill, input preparation, logits processors, stopping criteria), with the answer read one step late
(`LateStop`): the host queues step n + 1 while the GPU runs step n. `LateStop` is `DeferredStopCheck`'s idea
without its cache rollback (the loop never returns the cache), recording on the rows' own device rather than the
current one, and without events off CUDA, so that the same loop runs, and is tested, on a CPU.

Reading one step late means that a call ended by an end-of-sequence token (or stop string) runs one step more
than needed; its token is dropped, so the returned ids are transformers' loop's. That step runs like the others:
the forward, the logits processors and the stopping criteria see one call more (a stateful processor of the
caller's, or classifier-free guidance's own forward, among them), and with `do_sample=True` the random generator
ends one draw further on. The cache holds that step too, which is why the loop serves only calls whose cache
nobody sees afterwards (`loop_problem`). A call ended by its length stops on time.
"""

from __future__ import annotations

import torch
from torch import nn


class LateStop:
    """Whether the loop stops after this step, from the rows' finished flags read one step late.

    Each step's flag (and, for a streamer, its tokens) is copied to the host without waiting; the copy of the step
    before is read, by then long done. So the loop learns that every row finished one step after it happened: that
    step's tokens are dropped (`finish`). A length limit is known on the host and stops on time."""

    def __init__(self, rows: int, device: torch.device, max_length: int | None, streamer=None):
        cuda = device.type == "cuda"
        self.buffers = [(torch.zeros((), dtype=torch.bool, pin_memory=cuda),
                         torch.zeros(rows, dtype=torch.long, pin_memory=cuda),
                         torch.cuda.Event(blocking=True) if cuda else None) for _ in range(2)]  # waits sleep
        self.max_length, self.streamer = max_length, streamer
        self.pending = None  # the buffers of the last step, not read yet
        self.finished = False  # every row had finished one step before the last one

    def __call__(self, unfinished: torch.Tensor, tokens: torch.Tensor, length: int) -> bool:
        buffers = self.buffers[0] if self.pending is not self.buffers[0] else self.buffers[1]
        flag, host_tokens, copied = buffers
        flag.copy_(unfinished.max() == 0, non_blocking=True)
        if self.streamer is not None:
            host_tokens.copy_(tokens, non_blocking=True)
        if copied is not None:  # on the stream of the rows' device, which need not be the current one
            copied.record(torch.cuda.current_stream(unfinished.device))
        if self.pending is not None:
            self.finished = self._read(self.pending)
        self.pending = buffers
        return self.finished or (self.max_length is not None and length >= self.max_length)

    def finish(self) -> int:
        """How many steps ran past the stop (0 or 1): the caller drops their tokens. Streams the last kept step."""
        if self.finished or self.pending is None:
            return int(self.finished)
        self._read(self.pending)
        return 0

    def _read(self, buffers) -> bool:
        flag, host_tokens, copied = buffers
        if copied is not None:
            copied.synchronize()
        if self.streamer is not None:
            self.streamer.put(host_tokens.clone())
        return bool(flag)


def loop_problem(
    *,
    device_type: str,
    synced_gpus: bool,
    is_assistant: bool,
    return_dict_in_generate: bool,
    cache_returned: bool,
    auto_compile: bool,
    available: bool = True,
    planned: bool = True,
) -> str | None:
    """Why `sample_ahead` cannot run this `generate()` call (transformers' own loop does), or None. planned: the
    call's cache is an `InfiniteVLCache` that the package set up (`plan_generation`)."""
    if not available:
        return "this transformers' generation has no prefill step to build the loop from"
    if device_type != "cuda":
        return f"the model runs on {device_type}: the loop reads the stop late on CUDA only"
    if synced_gpus:
        return "synced_gpus=True: every rank checks the stop together"
    if is_assistant:
        return "the model drafts for assisted decoding"
    if not planned:
        return "the call runs without a cache the package set up"
    if return_dict_in_generate or cache_returned:
        return ("the caller may see the cache afterwards (return_dict_in_generate, a cache passed in, a custom "
                "decoding method), and it would hold the one step too many")
    if auto_compile:
        return "transformers compiles the forward itself"
    return None


def sample_ahead(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config,
                 streamer=None, **model_kwargs) -> torch.LongTensor:
    """The ids of a greedy or sampling `generate()` call (prompt and new tokens), as transformers' `_sample` returns
    them with `return_dict_in_generate=False`, with the stop read one step late (see the module docstring)."""
    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    pads_finished = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    stop = LateStop(input_ids.shape[0], input_ids.device, stopping_criteria.max_length, streamer)

    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    stopping = False
    with model._optimize_model_for_decode():
        while not stopping:
            if outputs is None:
                inputs = model.prepare_inputs_for_generation(
                    input_ids, next_sequence_length=1 if model_kwargs["use_cache"] else None, **model_kwargs)
                outputs = model(**inputs, return_dict=True)
            model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
            logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
            outputs = None  # the prompt's logits can be large: let them go now
            scores = logits_processor(input_ids, logits)
            if generation_config.do_sample:
                tokens = torch.multinomial(nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(scores, dim=-1)
            if pads_finished:  # rows that finished get padding (transformers' arithmetic blend, in two kernels, not four)
                tokens = torch.where(unfinished.bool(), tokens, pad_token_id)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            unfinished = unfinished & ~stopping_criteria(input_ids, None)
            stopping = stop(unfinished, tokens, input_ids.shape[1])
    extra = stop.finish()  # steps run past the stop
    if extra:
        input_ids = input_ids[:, :-extra].contiguous()  # as transformers' loop returns it
    if streamer is not None:
        streamer.end()
    return input_ids
