"""Matmul FLOPs of a compiled XLA program, each loop body counted once per trip.

XLA's cost_analysis() counts a while loop's body once whatever its trip count (measured on the CPU
backend of jax 0.10.2: a lax.scan of 1, 2, 3 and 5 matmuls gives the same 'flops'), so a program
that runs one body twice (DPO's reference and policy) reads as if it ran it once. This reads the
optimised HLO text (compiled.as_text()) instead:

    count = dot_flops(jax.jit(f).lower(*args).compile().as_text())
    count["flops"]     # 2 x (output elements) x (contracted length), summed over every dot
    count["loops"]     # {while instruction: trip count}
    count["uncounted"] # {custom-call target: calls} of custom calls that are not GEMMs (e.g. cuDNN attention)

Dots are counted wherever they sit (fusions, calls, async wrappers); a while body is multiplied by the
trip count XLA recorded in its backend_config (`known_trip_count`), and a loop without one is an
error (its cost is unknown). A conditional counts its costlier branch on every trip, an upper bound
where some trips take the other: DPO's loop runs the head's slope matmul in its policy trip only
(loss.token_logps), and the count holds it for the reference's trip too. cuBLAS GEMM custom calls
(the GPU backend's dots after its rewrite; not checked on a GPU yet) are counted from their dot
dimension numbers.
"""
from __future__ import annotations

import json
import math
import re

_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+(?P<op>[\w\-]+)\((?P<rest>.*)$")
_ARRAY = re.compile(r"(?P<dtype>[a-z]\w*)\[(?P<dims>[\d,]*)\]")
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")


def _dims(type_text: str) -> list[int]:
  """Dimensions of the first array in an HLO type (a tuple's first element)."""
  m = _ARRAY.search(type_text)
  if m is None:
    raise ValueError(f"no array type in {type_text!r}")
  return [int(d) for d in m.group("dims").split(",") if d]


def _operands(rest: str) -> list[str]:
  """Operand names of an instruction (the text inside its parentheses)."""
  depth, end = 1, 0
  for end, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      break
  return re.findall(r"%([\w.\-]+)", rest[:end])


def _int_list(text: str, key: str) -> list[int]:
  m = re.search(key + r"=\{([\d,]*)\}", text)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _parse(hlo_text: str) -> dict:
  """{computation: [(name, type text, opcode, rest of line)]}."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group("name"), [])
      continue
    if line.strip() == "}":
      current = None
      continue
    inst = _INSTRUCTION.match(line)
    if inst and current is not None:
      current.append((inst.group("name"), inst.group("type"), inst.group("op"), inst.group("rest")))
  return computations


def dot_flops(hlo_text: str) -> dict:
  """{'flops', 'loops', 'uncounted'} of an optimised HLO module's entry computation (module doc)."""
  computations = _parse(hlo_text)
  entry = re.search(r"^ENTRY\s+%([\w.\-]+)", hlo_text, re.M)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  shapes = {name: type_text for insts in computations.values() for name, type_text, _, _ in insts}
  loops, uncounted = {}, {}

  def called(rest: str, key: str) -> list[str]:
    m = re.search(key + r"=\{([^}]*)\}", rest) or re.search(key + r"=(%[\w.\-]+)", rest)
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []

  def cost(computation: str, stack: tuple = ()) -> float:
    if computation in stack:
      raise ValueError(f"computation {computation} calls itself")
    total = 0.0
    for name, type_text, op, rest in computations[computation]:
      if op == "dot":
        lhs = _dims(shapes[_operands(rest)[0]])
        contracted = math.prod(lhs[d] for d in _int_list(rest, "lhs_contracting_dims"))
        total += 2.0 * math.prod(_dims(type_text)) * contracted
      elif op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        target = target.group(1) if target else "?"
        if target in _GEMM_TARGETS:
          config = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
          lhs = _dims(shapes[_operands(rest)[0]])
          dims = [int(d) for d in json.loads(f"[{config.group(1)}]")] if config else []
          total += 2.0 * math.prod(_dims(type_text)) * math.prod(lhs[d] for d in dims)
        else:
          uncounted[target] = uncounted.get(target, 0) + 1
      elif op == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
        if trips is None:
          raise ValueError(f"while loop %{name} has no known trip count: its cost is unknown")
        loops[name] = int(trips.group(1))
        body = called(rest, "body")[0]
        total += loops[name] * (cost(body, stack + (computation,)) + cost(called(rest, "condition")[0],
                                                                           stack + (computation,)))
      elif op == "conditional":
        branches = called(rest, "branch_computations") or (called(rest, "true_computation")
                                                            + called(rest, "false_computation"))
        total += max((cost(b, stack + (computation,)) for b in branches), default=0.0)
      else:
        for key in ("calls", "to_apply") if op in ("call", "fusion", "async-start") else ("calls",):
          for sub in called(rest, key):
            total += cost(sub, stack + (computation,))
    return total

  return {"flops": cost(entry.group(1)), "loops": loops, "uncounted": uncounted}
