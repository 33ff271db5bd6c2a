"""The exercises of chapter 01-roofline: references pass, typical answers pass, typical mistakes fail."""

from __future__ import annotations

import math

import pytest

import labkit
from labkit.exercises import exercises_for

NAMES = ["roofline.attainable", "roofline.decode_critical_batch", "roofline.gemm_flops"]


def test_registered():
    assert exercises_for("01-roofline") == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_reference_passes_its_own_check(name):
    from labkit.exercises import lookup

    assert labkit.check(name, lookup(name).reference, quiet=True)


def student_gemm(M, N, K, bytes_per_elem):
    return 2 * M * N * K, (M * K + K * N + M * N) * bytes_per_elem


def student_attainable(device, intensity, dtype):
    return min(device.peak(dtype), device.bandwidth * intensity)


def student_critical(weights, peak_flops, bandwidth, bytes_per_elem):
    """The float closed form a student would write."""
    ridge, s, batch = peak_flops / bandwidth, bytes_per_elem, 1
    for K, N in weights:
        denom = 2 * N * K - ridge * s * (N + K)
        if denom <= 0:
            return math.inf
        batch = max(batch, math.ceil(ridge * s * N * K / denom))
    return batch


@pytest.mark.parametrize("name,fn", [
    ("roofline.gemm_flops", student_gemm),
    ("roofline.attainable", student_attainable),
    ("roofline.decode_critical_batch", student_critical),
])
def test_plain_float_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


@pytest.mark.parametrize("name,fn", [
    ("roofline.gemm_flops", lambda M, N, K, bytes_per_elem: (M * N * K, (M * K + K * N + M * N) * bytes_per_elem)),
    ("roofline.gemm_flops", lambda M, N, K, bytes_per_elem: (2 * M * N * K, (M * K + K * N) * bytes_per_elem)),
    ("roofline.attainable", lambda device, intensity, dtype: device.bandwidth * intensity),
    ("roofline.attainable", lambda device, intensity, dtype: max(device.peak(dtype), device.bandwidth * intensity)),
    # forgets the bytes per element (treats the ridge as FLOP per element)
    ("roofline.decode_critical_batch",
     lambda weights, peak_flops, bandwidth, bytes_per_elem: student_critical(weights, peak_flops, bandwidth, 1)),
    # the rough rule batch ~ ridge * s / 2, ignoring the activations' bytes
    ("roofline.decode_critical_batch",
     lambda weights, peak_flops, bandwidth, bytes_per_elem: math.ceil(peak_flops / bandwidth * bytes_per_elem / 2)),
    # only looks at the first weight matrix
    ("roofline.decode_critical_batch",
     lambda weights, peak_flops, bandwidth, bytes_per_elem: student_critical(weights[:1], peak_flops, bandwidth,
                                                                             bytes_per_elem)),
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


def test_not_attempted_does_not_raise():
    def todo(**kwargs):
        raise NotImplementedError("write me")

    result = labkit.check("roofline.gemm_flops", todo, quiet=True)
    assert result.status == "not attempted"
