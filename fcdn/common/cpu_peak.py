"""The CPU's float32 peak, from its cores, clock and instruction set (Linux).

    peak = float32_peak()          # CpuPeak(cores=2, ghz=2.45, flops_per_cycle=32, ...)
    peak.gflops                    # 156.8

peak = cores x clock x float32 FLOPs per cycle per core, where
- cores: the physical cores of /proc/cpuinfo (distinct "physical id"/"core id" pairs; the logical
  CPUs when those fields are absent, as on many virtual machines). Hyperthreads share their core's
  arithmetic units, so they add nothing to the peak;
- clock: the highest of /sys/devices/system/cpu/cpu*/cpufreq/cpuinfo_max_freq, else the highest
  "cpu MHz" of /proc/cpuinfo (the current clock: a virtual machine shows its nominal one);
- FLOPs per cycle from the flags of /proc/cpuinfo: avx512f: 2 FMA units x 16 lanes x 2 = 64 (the
  Xeons with two 512-bit FMA units; a CPU with one, or with 256-bit halves, reaches half of it);
  avx2 with fma: 2 FMA units x 8 lanes x 2 = 32; avx: an 8-lane add and an 8-lane multiply = 16;
  otherwise SSE: 4-lane add and multiply = 8.
It is the ceiling no program exceeds, not a figure any network reaches.
"""

import dataclasses
import glob

# (flag, FLOPs per cycle per core, what it stands for), the widest first
INSTRUCTION_SETS = (
    ("avx512f", 64, "AVX-512: 2 FMA units x 16 float32 lanes x 2"),
    ("fma", 32, "AVX2+FMA: 2 FMA units x 8 float32 lanes x 2"),
    ("avx", 16, "AVX: 8-lane add + 8-lane multiply"),
    ("sse", 8, "SSE: 4-lane add + 4-lane multiply"),
)


@dataclasses.dataclass(frozen=True)
class CpuPeak:
    cores: int
    ghz: float
    flops_per_cycle: int
    instruction_set: str
    model_name: str

    @property
    def gflops(self):
        return self.cores * self.ghz * self.flops_per_cycle

    def describe(self):
        return (f"{self.model_name}: {self.cores} core(s) x {self.ghz:.2f} GHz x {self.flops_per_cycle} "
                f"FLOP/cycle ({self.instruction_set}) = {self.gflops:.1f} GFLOP/s float32 peak")


def parse_cpuinfo(text, max_frequencies_khz=()):
    """CpuPeak from /proc/cpuinfo's text and the cpufreq maxima (kHz) when there are any.
    ValueError when the text names no processor."""
    processors = [dict(_fields(block)) for block in text.split("\n\n") if "processor" in block]
    if not processors:
        raise ValueError("/proc/cpuinfo lists no processor")
    pairs = {(entry.get("physical id"), entry.get("core id")) for entry in processors}
    cores = len(pairs) if ("physical id" in processors[0] and "core id" in processors[0]) else len(processors)
    if max_frequencies_khz:
        ghz = max(max_frequencies_khz) / 1e6
    else:
        ghz = max(float(entry.get("cpu MHz", 0)) for entry in processors) / 1e3
    flags = set(processors[0].get("flags", "").split())
    flops, description = next(((flops, text) for flag, flops, text in INSTRUCTION_SETS
                               if flag in flags and (flag != "fma" or "avx2" in flags)), (8, INSTRUCTION_SETS[-1][2]))
    return CpuPeak(cores, ghz, flops, description, processors[0].get("model name", "unknown CPU"))


def _fields(block):
    for line in block.splitlines():
        key, separator, value = line.partition(":")
        if separator:
            yield key.strip(), value.strip()


def float32_peak(cpuinfo_path="/proc/cpuinfo"):
    """The CpuPeak of this machine (Linux)."""
    with open(cpuinfo_path) as handle:
        text = handle.read()
    maxima = []
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq"):
        try:
            with open(path) as handle:
                maxima.append(int(handle.read()))
        except (OSError, ValueError):
            continue
    return parse_cpuinfo(text, maxima)
