import pytest

import infinitevl_hf  # noqa: F401  (registers the Auto classes)


@pytest.fixture(scope="session")
def tiny_stream_dir(tmp_path_factory):
    """A tiny checkpoint with a 16-token window, so a few frames already fill every attention window."""
    return infinitevl_hf.tiny_checkpoint(tmp_path_factory.mktemp("stream") / "ckpt", sliding_window=16)


@pytest.fixture(scope="session")
def processor(tiny_stream_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_stream_dir)


@pytest.fixture(scope="session")
def model(tiny_stream_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_stream_dir).eval()
