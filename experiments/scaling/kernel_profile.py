"""Where a compiled step's time goes on the CPU, by kind of kernel.

XLA compiles a jitted function into kernels, one per instruction of its optimised HLO module;
a fusion of elementwise operations runs as one kernel. `profile_by_kind` traces calls of a
compiled function with `jax.profiler`, matches each traced kernel to its instruction by name,
and sums count and time by kind (`kernel_kinds`): matrix products (a `dot`, or a fusion that
contains one), gathers, scatters, reductions, elementwise fusions, copies, and any other
instruction by its opcode. Tracing slows each kernel a little and XLA may run two kernels at
once, so the kinds' times need not add up to a call's wall-clock: compare kinds and counts
between functions profiled alike, not with untraced timings.

The CPU backend names each kernel in the trace after its instruction; on a backend that does
not, no kernel matches and `profile_by_kind` raises.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Any

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_CALLED = re.compile(r"calls=%?([\w.\-]+)")

FUSION_KINDS = (("dot", "matrix product"), ("scatter", "scatter"), ("gather", "gather"))
"""A fusion's kind is that of the first of these opcodes it contains, else `reduction` if it
contains a `reduce` or `reduce-window`, else `elementwise`."""

OPCODE_KINDS = {"dot": "matrix product", "reduce": "reduction", "reduce-window": "reduction"}
"""Kinds of unfused instructions whose kind is not their opcode."""


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """Each computation's name (without `%`) → its instruction lines, from HLO module text."""
  computations: dict[str, list[str]] = {}
  body: list[str] | None = None
  for line in hlo_text.splitlines():
    if line.rstrip().endswith("{") and not line.startswith((" ", "\t", "HloModule")):
      name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
      body = computations.setdefault(name.lstrip("%"), [])
    elif line.strip() == "}":
      body = None
    elif body is not None:
      body.append(line)
  return computations


def _opcodes(lines: list[str]) -> set[str]:
  opcodes = set()
  for line in lines:
    match = _INSTRUCTION.match(line)
    opcode = match and _OPCODE.search(" " + match.group(2))
    if opcode:
      opcodes.add(opcode.group(1))
  return opcodes


def kernel_kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name → kind, for every instruction of an optimised HLO module's text (e.g.
  `jax.jit(f).lower(*args).compile().as_text()`); see `FUSION_KINDS` and `OPCODE_KINDS`."""
  computations = _computations(hlo_text)
  kinds = {}
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      opcode = match and _OPCODE.search(" " + match.group(2))
      if not opcode:
        continue
      name, opcode = match.group(1), opcode.group(1)
      if opcode != "fusion":
        kinds[name] = OPCODE_KINDS.get(opcode, opcode)
        continue
      called = _CALLED.search(line)
      fused = _opcodes(computations.get(called.group(1), [])) if called else set()
      kinds[name] = next(
        (kind for op, kind in FUSION_KINDS if op in fused),
        "reduction" if fused & {"reduce", "reduce-window"} else "elementwise",
      )
  return kinds


def profile_by_kind(
  call: Callable[[], Any], hlo_text: str, calls: int
) -> dict[str, tuple[float, float]]:
  """Kind → (kernels per call, traced seconds per call) over `calls` traced calls of `call`,
  which runs the compiled module whose optimised HLO is `hlo_text`; kinds by total time."""
  kinds = kernel_kinds(hlo_text)
  jax.block_until_ready(call())  # Nothing left over from before enters the trace.
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(call())
    (path,) = glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as file:
      trace = json.load(file)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  counts: collections.Counter[str] = collections.Counter()
  microseconds: collections.Counter[str] = collections.Counter()
  for event in events:
    kind = kinds.get(event.get("name", "")) if event.get("ph") == "X" else None
    if kind is not None:
      counts[kind] += 1
      microseconds[kind] += event["dur"]
  if not counts:
    raise RuntimeError(
      f"No traced kernel matched an instruction of the module on {jax.default_backend()}: "
      "the kernel profile needs the CPU backend, which names kernels after instructions."
    )
  return {
    kind: (counts[kind] / calls, 1e-6 * total / calls) for kind, total in microseconds.most_common()
  }
