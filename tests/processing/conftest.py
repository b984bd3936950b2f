import pytest

import infinitevl_hf  # noqa: F401  (registers the Auto classes)
from infinitevl_hf.tiny import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """One tiny random checkpoint (model + processor) shared by the processing tests."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def model(tiny_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
