"""The package's layout: no import circles, and the product does not depend on its tools.

The graph is read from the source (ast), not by importing: every `import gpt2_lora_jax.x`,
`from gpt2_lora_jax import x` and `from gpt2_lora_jax.x import y` of every module, those inside
functions included (a lazy import is still a circle: it only moves the failure to run time).
Importing a submodule also runs its packages' __init__.py, so an edge to a.b.c is an edge to a.b too.
"""
import ast
import pathlib

PACKAGE = "gpt2_lora_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
TOOLS = (f"{PACKAGE}.bench", f"{PACKAGE}.demo")  # may import the benchmark subpackage


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> tuple[dict[str, set[str]], int]:
  """(module -> the package's modules it imports, how many of those imports sit inside a function)."""
  files = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}

  def known(name: str) -> str:  # a.b.NAME where NAME is a function or class: the module a.b
    while name not in files:
      name = name.rpartition(".")[0]
    return name

  def with_packages(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}

  graph, in_functions = {}, 0
  for name, path in files.items():
    tree = ast.parse(path.read_text(), str(path))
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    targets = set()
    for node in ast.walk(tree):
      found = set()
      if isinstance(node, ast.Import):
        found = {known(a.name) for a in node.names if a.name.split(".")[0] == PACKAGE}
      elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from its package (or a parent) down
          base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
          base = base[:len(base) - node.level + 1]
          source = ".".join(base + ([node.module] if node.module else []))
        else:
          source = node.module or ""
        if source.split(".")[0] == PACKAGE:
          found = {f"{source}.{a.name}" if f"{source}.{a.name}" in files else known(source) for a in node.names}
      if found:
        in_functions += id(node) in inside
        targets |= set().union(*(with_packages(t) for t in found))
    graph[name] = targets - with_packages(name)  # a module's own packages are imported before it
  return graph, in_functions


def find_cycle(graph: dict[str, set[str]]):
  """One import circle as [a, b, ..., a], or None (depth-first search, colouring the modules)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_package_has_no_import_circles():
  graph, in_functions = import_graph()
  assert len(graph) > 40 and in_functions > 0  # the scan saw the package, lazy imports included
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_search_finds_a_circle():
  """The search itself, on a graph written here: a -> b -> c -> a, plus a branch that closes none."""
  assert find_cycle({"a": {"b", "d"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "d"}, "b": {"c"}, "c": set(), "d": {"c"}}) is None


def test_the_product_does_not_import_the_benchmark():
  graph, _ = import_graph()
  def under(module, package):
    return module == package or module.startswith(package + ".")
  offenders = {m: sorted(t for t in targets if under(t, f"{PACKAGE}.bench"))
               for m, targets in graph.items() if not any(under(m, tools) for tools in TOOLS)}
  assert {m: t for m, t in offenders.items() if t} == {}
