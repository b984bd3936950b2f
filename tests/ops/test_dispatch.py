"""The op registry (`ops.dispatch`): implementations in order of preference, the reference last; a refusing fit
check falls through; the reason is logged once; one switch and one scope force the reference."""

import logging

import pytest
import torch

from infinitevl_hf.modeling.ops import dispatch


def _op(fits_first, fits_second):
    op = dispatch.Op("toy", lambda x: ("torch", x))
    op.register("first", lambda x: ("first", x), fits_first)
    op.register("second", lambda x: ("second", x), fits_second)
    return op


def test_implementations_run_in_order_of_preference_with_the_reference_last():
    op = _op(lambda x: None, lambda x: None)
    assert [impl.name for impl in op.implementations] == ["first", "second", "torch"]
    assert op(1) == ("first", 1)


def test_an_implementation_whose_check_refuses_falls_through_to_the_next():
    op = _op(lambda x: "x is odd" if x % 2 else None, lambda x: "x is large" if x > 2 else None)
    assert op(2) == ("first", 2)
    assert op(1) == ("second", 1)
    assert op(3) == ("torch", 3)
    impl, reason = op.decide(3)
    assert impl.name == "torch" and reason == "first: x is odd"  # the preferred one's reason, named


def test_the_choice_and_reason_are_logged_once(caplog):
    op = _op(lambda x: "not today", lambda x: "nor today")
    logger = logging.getLogger(dispatch.logger.name)
    logger.propagate, propagate = True, logger.propagate
    try:
        with caplog.at_level(logging.INFO, logger=dispatch.logger.name):
            op(1)
            op(2)
    finally:
        logger.propagate = propagate
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("toy:")]
    assert lines == ["toy: using torch (first: not today)."]


def test_the_env_switch_and_the_scope_force_the_reference(monkeypatch):
    op = _op(lambda x: None, lambda x: None)
    monkeypatch.setenv(dispatch.TORCH_OPS_ENV, "1")
    assert op(1) == ("torch", 1)
    assert op.decide(1)[1] == f"{dispatch.TORCH_OPS_ENV} is set"
    monkeypatch.setenv(dispatch.TORCH_OPS_ENV, "0")  # read at call time
    assert op(1) == ("first", 1)
    with dispatch.prefer_reference():
        assert op(1) == ("torch", 1)
    assert op(1, reference=True) == ("torch", 1)
    assert op(1) == ("first", 1)


def test_cached_decisions_follow_the_switch(monkeypatch):
    calls = []
    op = dispatch.Op("keyed", lambda x: "torch", key=lambda x: (x.device.type,))
    op.register("fast", lambda x: "fast", lambda x: calls.append(1))
    x = torch.zeros(2)
    assert op(x) == op(x) == "fast" and len(calls) == 1  # the second call is a lookup
    monkeypatch.setenv(dispatch.TORCH_OPS_ENV, "1")
    assert op(x) == "torch"


def test_elementwise_ops_run_their_torch_definition_off_cuda():
    from infinitevl_hf.modeling.ops.norms import rms_norm, torch_rms_norm

    x, w = torch.randn(3, 8), torch.randn(8)
    with torch.no_grad():
        assert dispatch.select("rms_norm", x, w, 1e-6) == "torch"
        torch.testing.assert_close(rms_norm(x, w, 1e-6), torch_rms_norm(x, w, 1e-6), rtol=0, atol=0)
    impl, reason = dispatch.op("rms_norm").decide(x, w, 1e-6)
    assert impl.name == "torch" and reason == "triton: autograd is on"  # the package's kernel is preferred


def test_every_kernel_op_keeps_its_reference_last():
    for name in ("matvec", "rms_norm_matvec", "decode_attention", "gated_delta_rule_decode_step", "vision_rotary_qk",
                 "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "causal_conv1d", "piece_attention",
                 "rms_norm", "add_rms_norm", "gated_rms_norm", "silu_mul", "silu_glu", "apply_rotary", "gdn_gates"):
        assert dispatch.op(name).implementations[-1].name == "torch", name
    with pytest.raises(ValueError, match="registered already"):
        dispatch.register_op("rms_norm", lambda x: x)


def test_triton_available_is_one_cached_answer():
    assert dispatch.triton_available() is dispatch.triton_available()
    assert dispatch.triton_available.cache_info().currsize == 1


def test_the_switches_are_read_from_the_environment_at_call_time(monkeypatch):
    from infinitevl_hf.modeling.ops import dispatch

    monkeypatch.delenv(dispatch.TORCH_OPS_ENV, raising=False)
    assert dispatch._env(dispatch.TORCH_OPS_ENV) is None and not dispatch.torch_ops_forced()
    for value, forced in (("1", True), (" On ", True), ("0", False), ("", False)):
        monkeypatch.setenv(dispatch.TORCH_OPS_ENV, value)
        assert dispatch._env(dispatch.TORCH_OPS_ENV) == value and dispatch.torch_ops_forced() is forced
    monkeypatch.delenv(dispatch.TORCH_OPS_ENV)
    assert dispatch._env(dispatch.TORCH_OPS_ENV) is None
