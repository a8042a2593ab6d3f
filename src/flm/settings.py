"""Every FLM_* environment switch, read here and nowhere else.

Each switch is read when it is needed (tests and long-lived processes may change the environment
between loads), through `setting(name)`, which also refuses values a switch does not take.
`flm --help` prints SWITCHES, so a new switch is documented by adding it here.
"""

from __future__ import annotations

import logging
import os
import textwrap
from dataclasses import dataclass

log = logging.getLogger("flm")


@dataclass(frozen=True)
class Switch:
    default: str
    choices: tuple[str, ...] | None  # None: any value (a path)
    help: str


SWITCHES: dict[str, Switch] = {
    "FLM_CACHE": Switch("", None, "downloads, the built-in model and compiled kernels (default ~/.cache/flm)"),
    "FLM_ISA": Switch("", ("", "avx2", "avx512", "avx512vnni", "avx512bf16"),
                      "build the CPU kernels for a narrower instruction set than the CPU has"),
    "FLM_KERNELS": Switch("auto", ("auto", "reference"),
                          "reference: no compiled or Triton kernels, the plain torch linears (dequantize + matmul)"),
    "FLM_PREFILL": Switch("bfloat16", ("bfloat16", "float32"),
                          "float32: prompts in float32 on AVX512-BF16 CPUs (default bfloat16 dot products)"),
    "FLM_BACKEND": Switch("auto", ("auto", "torch", "cpu-step", "cuda-graph"),
                          "how tokens run (default: the fastest the device allows): torch = the reference "
                          "forward in torch ops, cpu-step = one C++ call per decode step, cuda-graph = "
                          "replayed CUDA graphs with Triton attention"),
}


def setting(name: str) -> str:
    """The switch's value (lower-cased where it takes a fixed set), its default when unset; a
    value outside its choices is logged and the default used, so a typo never stops a run."""
    switch = SWITCHES[name]
    value = os.environ.get(name, switch.default)
    if switch.choices is None:
        return value
    value = value.strip().lower()
    if value not in switch.choices:
        log.warning("%s=%s is not one of %s; using %r", name, value, ", ".join(c for c in switch.choices if c),
                    switch.default)
        return switch.default
    return value


def help_text() -> str:
    """The switches as `flm --help` lists them."""
    lines = ["environment variables:"]
    for name, switch in SWITCHES.items():
        values = "|".join(c for c in switch.choices if c) if switch.choices else "DIR"
        lines.append(f"  {name}={values}")
        lines += textwrap.wrap(switch.help, width=94, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
