"""Print, as JSON, the modules each Python file imports (also imports inside functions).

`tests/test_layers.py` runs this in a child interpreter: CPython 3.11.7's AST constructor keeps
its recursion depth per interpreter, not per thread, so an `ast.parse` in a test process whose
other threads (Ray, MLflow) also build ASTs can fail with "AST constructor recursion depth
mismatch" (python/cpython#106905, fixed in 3.11.8). A fresh interpreter has no other threads.
"""

from __future__ import annotations

import ast
import json
import sys


def imported_modules(source: str, filename: str = "<source>") -> list[str]:
    """Every module the source imports: `import a.b` gives a.b, `from a import b` gives a and a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return sorted(found)


if __name__ == "__main__":
    paths = sys.argv[1:]
    print(json.dumps({p: imported_modules(open(p, encoding="utf-8").read(), p) for p in paths}))
