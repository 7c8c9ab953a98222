"""The FLOP count of a model's layers against a hand count, and the CPU's float32 peak from /proc/cpuinfo."""

import keras
import pytest
from keras import layers

from fcdn.common import cpu_peak
from fcdn.model import flops


@pytest.fixture(scope="module")
def small_network():
    """Every counted layer type once, a concatenation and a pool between them (counted as nothing)."""
    inputs = keras.Input(shape=(None, None, 1))
    convolved = layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    normalised = layers.BatchNormalization()(convolved)
    pooled = layers.MaxPooling2D(2)(layers.ReLU()(normalised))
    upsampled = layers.Conv2DTranspose(2, 3, strides=2, padding="same")(pooled)
    stacked = layers.Concatenate()([normalised, upsampled])
    mixed = layers.Conv2D(3, 1)(stacked)
    outputs = layers.Activation("softmax")(layers.Dense(5)(mixed))
    return keras.Model(inputs, outputs)


def test_flops_are_twice_the_hand_counted_multiply_adds(small_network):
    pixels = 8 * 8
    multiply_adds = (pixels * 4 * 3 * 3 * 1      # 3x3 convolution, 1 -> 4 channels
                     + pixels * 4                # batch normalisation: a scale and a shift per element
                     + 4 * 4 * 4 * 3 * 3 * 2     # transposed convolution: 4x4 input pixels x 4 channels x 3x3 x 2
                     + pixels * 6 * 3            # 1x1 convolution over the 4 + 2 stacked channels
                     + pixels * 3 * 5)           # dense layer at every pixel
    assert multiply_adds == 5824
    assert flops.forward_flops(small_network, 8, 8) == 2 * multiply_adds
    assert flops.forward_flops(small_network, 16, 8) == 4 * multiply_adds  # twice the pixels


CPUINFO_AVX2_VM = """processor\t: 0
model name\t: AMD EPYC
cpu MHz\t\t: 2445.424
flags\t\t: fpu sse sse2 avx fma avx2

processor\t: 1
model name\t: AMD EPYC
cpu MHz\t\t: 2445.424
flags\t\t: fpu sse sse2 avx fma avx2
"""


def _hyperthreaded(flags):
    blocks = [f"processor\t: {index}\nmodel name\t: Xeon\nphysical id\t: 0\ncore id\t: {index // 2}\n"
              f"cpu MHz\t\t: 1200.000\nflags\t\t: {flags}\n" for index in range(4)]
    return "\n".join(blocks)


def test_peak_from_cores_clock_and_instruction_set():
    vm = cpu_peak.parse_cpuinfo(CPUINFO_AVX2_VM)
    assert (vm.cores, vm.flops_per_cycle) == (2, 32)
    assert vm.gflops == pytest.approx(2 * 2.445424 * 32)
    # hyperthreads share a core; the cpufreq maximum (kHz) wins over the current clock
    xeon = cpu_peak.parse_cpuinfo(_hyperthreaded("sse avx fma avx2 avx512f"), [3500000, 3400000])
    assert (xeon.cores, xeon.ghz, xeon.flops_per_cycle, xeon.gflops) == (2, 3.5, 64, 448.0)
    assert cpu_peak.parse_cpuinfo(_hyperthreaded("sse avx fma")).flops_per_cycle == 16  # FMA3 without AVX2
    assert cpu_peak.parse_cpuinfo(_hyperthreaded("sse sse2")).flops_per_cycle == 8
    with pytest.raises(ValueError, match="no processor"):
        cpu_peak.parse_cpuinfo("")
