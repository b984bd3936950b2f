"""The captured prompt lengths: a prompt is laid into the smallest one that holds it, under the window."""

from infinitevl_hf.speed.prompt_graphs import PROMPT_BUCKETS, prompt_bucket


def test_padding_stays_a_small_part_of_a_prompt():
    for length in range(1, 8193):
        bucket = prompt_bucket(length, 8192)
        assert bucket >= length and bucket in PROMPT_BUCKETS, length
        most = 64 if length <= 512 else 128 if length <= 2048 else 256 if length <= 4096 else 512
        assert bucket - length < most or bucket == 64, length


def test_a_photo_prompt_pads_to_the_next_64():
    assert prompt_bucket(319, 8192) == 320 and prompt_bucket(331, 8192) == 384


def test_a_1k_text_prompt_pads_to_the_next_128():
    assert prompt_bucket(1053, 8192) == 1152 and prompt_bucket(1025, 8192) == 1152 and prompt_bucket(2048, 8192) == 2048


def test_a_page_prompt_pads_to_the_next_256():
    assert prompt_bucket(3133, 8192) == 3328


def test_no_bucket_past_the_window():
    assert prompt_bucket(3133, 2048) is None
    assert prompt_bucket(8193, 1 << 20) is None
    assert prompt_bucket(100, 100) is None  # 128 would cross a 100-token window
