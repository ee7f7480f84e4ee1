"""The import graph matches the layer table in docs/ARCHITECTURE.md, row for row."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "ARCHITECTURE.md")


def layer_table():
  """`{row: (module prefixes, allowed rows)}` parsed from the doc's marked table."""
  text = open(DOC, encoding="utf-8").read()
  body = text.split("<!-- layers -->")[1].split("<!-- /layers -->")[0]
  rows = {}
  for line in body.strip().splitlines()[2:]:
    name, modules, allowed, _ = [c.strip() for c in line.strip().strip("|").split("|")]
    rows[name] = (
      re.findall(r"`([\w.]+)`", modules),
      {a.strip() for a in allowed.split(",") if a.strip()},
    )
  return rows


def row_of(module: str, rows) -> str:
  """The row whose module prefix is the longest match of `module`."""
  best, length = None, -1
  for name, (prefixes, _) in rows.items():
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
        best, length = name, len(prefix)
  assert best is not None, f"{module} is in no row of docs/ARCHITECTURE.md"
  return best


def imports():
  """`[(importing module, imported oftjax module)]` for every file under oftjax/."""
  found = []
  for folder, _, files in os.walk(os.path.join(ROOT, "oftjax")):
    for file in files:
      if not file.endswith(".py"):
        continue
      path = os.path.join(folder, file)
      module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
      for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("oftjax"):
          names = (
            [node.module + "." + a.name for a in node.names]
            if node.module == "oftjax"
            else [node.module]
          )
          found += [(module, n) for n in names]
        elif isinstance(node, ast.Import):
          found += [(module, a.name) for a in node.names if a.name.startswith("oftjax")]
  return found


def test_every_oftjax_import_follows_the_layer_table():
  rows = layer_table()
  bad = []
  for importer, imported in imports():
    src, dst = row_of(importer, rows), row_of(imported, rows)
    if dst != src and dst not in rows[src][1]:
      bad.append(f"{importer} ({src}) imports {imported} ({dst})")
  assert not bad, "imports outside docs/ARCHITECTURE.md's table:\n" + "\n".join(bad)


def test_every_row_names_existing_modules_and_rows():
  rows = layer_table()
  for name, (prefixes, allowed) in rows.items():
    assert allowed <= set(rows), (name, allowed - set(rows))
    for prefix in prefixes:
      rel = prefix.replace(".", os.sep)
      assert os.path.isdir(os.path.join(ROOT, rel)) or os.path.isfile(
        os.path.join(ROOT, rel + ".py")
      ), f"row {name}: {prefix} does not exist"
