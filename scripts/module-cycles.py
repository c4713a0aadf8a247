#!/usr/bin/env python3
"""Proves that no module of a crate imports, directly or through others, a module that
imports it back.

Usage: scripts/module-cycles.py DIR [DIR ...]     e.g. callback-api/src bridge/src

Each DIR is a crate's source directory. Every .rs file is one module, named by its path:
lib.rs and main.rs are the crate root, foo.rs and foo/mod.rs are `foo`, foo/bar.rs is
`foo::bar`. Files under bin/ are binary crates of their own (bin/x.rs or bin/x/main.rs is a
root, bin/x/y.rs its module `y`) and are checked separately. `#[path]` attributes are not
followed.

What counts as a reference from module X to module Y (X != Y):
  * a `use` of a path starting with `crate::`, `super::`, `self::` or a child module's name,
    grouped imports (`use crate::{a, b::{c, d}}`) counted leaf by leaf;
  * a path in code (types, expressions, macro arguments) starting with `crate::`, `super::`
    or `self::`, or with a name the file imported with `use`.
  Each path resolves to the deepest module file it names (`crate::a::b::T` is `a::b` if
  a/b.rs exists, else `a`). A path that names an item a module re-exports by name
  (`pub use child::T;` in a's file, so `crate::a::T`) resolves on to the module the item
  comes from; glob re-exports (`pub use child::*`) are not followed. Inline modules
  (`mod x { .. }`) belong to their file, but `super::` inside them counts from the inline
  module. `$crate::` in macros and `pub(in crate::..)` visibilities are not references.
What is left out:
  * references between a module and its own ancestors or descendants (a parent declaring
    `mod child;`, re-exporting `pub use child::T` or calling into its child, and a child
    using its parent's items): these are the module tree, not a circle;
  * everything inside an item marked `#[cfg(test)]` (or `#[cfg(all(test, ..))]`): test
    modules, test-only functions and `use`s, and the files of `#[cfg(test)] mod x;`;
  * comments and string, byte-string, raw-string and char literals (a `crate::` in them is
    text, not a path).

References form a directed graph; every strongly connected component of more than one module
is an import circle. Each is printed with its modules and one reference (file:line) for every
edge between them, and one circle through all of them where a short one exists. Exits 1 if any
circle is found, 2 on bad arguments, else 0 with a one-line summary.
"""

import os
import sys
from collections import defaultdict, deque

# ---------------------------------------------------------------------------------------------
# Lexing: identifiers, `::` and single punctuation characters, with their line numbers.
# Comments and literals are dropped.


def lex(text):
    tokens = []  # (kind, value, line); kind is "id", "p" (punctuation) or "lit"
    i, n, line = 0, len(text), 1

    def is_id_start(c):
        return c.isalpha() or c == "_"

    def is_id_char(c):
        return c.isalnum() or c == "_"

    def skip_quoted(j, quote):
        # j is just past the opening quote; returns the index past the closing one.
        nonlocal line
        while j < n:
            c = text[j]
            if c == "\\":
                if j + 1 < n and text[j + 1] == "\n":
                    line += 1
                j += 2
                continue
            if c == "\n":
                line += 1
            if c == quote:
                return j + 1
            j += 1
        return j

    def skip_raw(j):
        # j is at the `r`; returns the index past the raw string, or None if not one.
        nonlocal line
        k = j + 1
        hashes = 0
        while k < n and text[k] == "#":
            hashes += 1
            k += 1
        if k >= n or text[k] != '"':
            return None
        end = '"' + "#" * hashes
        close = text.find(end, k + 1)
        if close < 0:
            close = n
        line += text.count("\n", k, close)
        return close + len(end)

    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    if text[j] == "\n":
                        line += 1
                    j += 1
            i = j
        elif c == '"':
            start = line
            i = skip_quoted(i + 1, '"')
            tokens.append(("lit", "", start))
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}') or a lifetime / label ('a, 'static).
            if i + 1 < n and text[i + 1] == "\\":
                i = skip_quoted(i + 1, "'")
                tokens.append(("lit", "", line))
            elif i + 2 < n and text[i + 2] == "'":
                i += 3
                tokens.append(("lit", "", line))
            else:
                j = i + 1
                while j < n and is_id_char(text[j]):
                    j += 1
                i = j
                tokens.append(("p", "'", line))
        elif is_id_start(c):
            # Literal prefixes first: r"..", r#".."#, b"..", b'..', br".., c"..", cr"..
            if c in "bcr":
                prefix_end = i + 1
                if c in "bc" and prefix_end < n and text[prefix_end] == "r":
                    prefix_end += 1
                if text[prefix_end - 1] == "r":
                    end = skip_raw(prefix_end - 1)
                    if end is not None:
                        tokens.append(("lit", "", line))
                        i = end
                        continue
                elif prefix_end < n and text[prefix_end] in "\"'":
                    start = line
                    i = skip_quoted(prefix_end + 1, text[prefix_end])
                    tokens.append(("lit", "", start))
                    continue
            if c == "r" and text.startswith("r#", i) and i + 2 < n and is_id_start(text[i + 2]):
                i += 2  # raw identifier r#name
            j = i
            while j < n and is_id_char(text[j]):
                j += 1
            tokens.append(("id", text[i:j], line))
            i = j
        elif c.isdigit():
            j = i
            while j < n and (is_id_char(text[j]) or (text[j] == "." and j + 1 < n and text[j + 1].isdigit())):
                j += 1
            tokens.append(("lit", "", line))
            i = j
        elif text.startswith("::", i):
            tokens.append(("p", "::", line))
            i += 2
        else:
            tokens.append(("p", c, line))
            i += 1
    return tokens


def is_p(tok, value):
    return tok[0] == "p" and tok[1] == value


def is_id(tok, value=None):
    return tok[0] == "id" and (value is None or tok[1] == value)


# ---------------------------------------------------------------------------------------------
# Dropping `#[cfg(test)]` items.

OPEN, CLOSE = "([{", ")]}"


def matching(tokens, i):
    """Index of the bracket closing the one at tokens[i]."""
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j][0] == "p" and tokens[j][1] in OPEN:
            depth += 1
        elif tokens[j][0] == "p" and tokens[j][1] in CLOSE:
            depth -= 1
            if depth == 0:
                return j
    return len(tokens) - 1


def is_test_cfg(attr):
    """attr: the tokens between `#[` and `]`."""
    values = [t[1] for t in attr]
    if values == ["cfg", "(", "test", ")"]:
        return True
    if values[:4] == ["cfg", "(", "all", "("]:
        depth = 0
        for k, t in enumerate(attr[3:], start=3):
            if is_p(t, "("):
                depth += 1
            elif is_p(t, ")"):
                depth -= 1
            elif depth == 1 and is_id(t, "test"):
                return True
    return False


def strip_test_items(tokens):
    """Returns (tokens without test-only items, names of `#[cfg(test)] mod x;` children,
    whether the whole file is test-only)."""
    out, test_children, i = [], set(), 0
    while i < len(tokens):
        tok = tokens[i]
        inner = i + 2 < len(tokens) and is_p(tok, "#") and is_p(tokens[i + 1], "!") and is_p(tokens[i + 2], "[")
        outer = i + 1 < len(tokens) and is_p(tok, "#") and is_p(tokens[i + 1], "[")
        if not (inner or outer):
            out.append(tok)
            i += 1
            continue
        open_at = i + 2 if inner else i + 1
        close_at = matching(tokens, open_at)
        if not is_test_cfg(tokens[open_at + 1 : close_at]):
            out.extend(tokens[i : close_at + 1])
            i = close_at + 1
            continue
        if inner:
            return [], test_children, True
        # Skip further attributes, then the item: up to `;` or the end of its first `{ }` block.
        j = close_at + 1
        while j + 1 < len(tokens) and is_p(tokens[j], "#") and is_p(tokens[j + 1], "["):
            j = matching(tokens, j + 1) + 1
        item_start = j
        while j < len(tokens):
            t = tokens[j]
            if is_p(t, ";"):
                break
            if t[0] == "p" and t[1] in "([":
                j = matching(tokens, j) + 1
                continue
            if is_p(t, "{"):
                j = matching(tokens, j)
                break
            j += 1
        item = [t[1] for t in tokens[item_start : j + 1]]
        words = [w for w in item if w not in ("pub", "(", ")", "crate", "super", "self", "in")]
        if len(words) >= 3 and words[0] == "mod" and words[2] == ";":
            test_children.add(words[1])
        i = j + 1
    return out, test_children, False


# ---------------------------------------------------------------------------------------------
# Collecting paths.


class Ref:
    """A path written in a file: its segments and the inline module it was written in."""

    def __init__(self, segments, line, scope):
        self.segments, self.line, self.scope = segments, line, scope


def parse_use_tree(tokens, i, prefix, leaves):
    """Parses one use tree at tokens[i]; appends (segments, bound name or None, line) to leaves.
    Returns the index after the tree."""
    segs = list(prefix)
    line = tokens[i][2] if i < len(tokens) else 0
    if i < len(tokens) and is_p(tokens[i], "::"):
        i += 1
    while i < len(tokens):
        t = tokens[i]
        if t[0] == "id" and t[1] != "as":
            segs.append(t[1])
            line = t[2]
            i += 1
            if i < len(tokens) and is_p(tokens[i], "::"):
                i += 1
                continue
            if i + 1 < len(tokens) and is_id(tokens[i], "as"):
                alias = tokens[i + 1][1]
                leaves.append((segs, None if alias == "_" else alias, line))
                return i + 2
            bound = segs[-2] if segs[-1] == "self" and len(segs) > 1 else segs[-1]
            if segs[-1] == "self":
                segs = segs[:-1]
            leaves.append((segs, bound, line))
            return i
        if is_p(t, "*"):
            leaves.append((segs, None, t[2]))
            return i + 1
        if is_p(t, "{"):
            i += 1
            while i < len(tokens) and not is_p(tokens[i], "}"):
                i = parse_use_tree(tokens, i, segs, leaves)
                if i < len(tokens) and is_p(tokens[i], ","):
                    i += 1
            return i + 1
        return i + 1
    return i


def collect(tokens):
    """Returns (use declarations, other paths, child modules declared in the file).
    A use declaration is (leaves, public, scope)."""
    uses, paths, declared = [], [], set()
    scope = []  # names of the inline modules we are in
    scope_close = []  # brace depth at which each inline module ends
    depth, i = 0, 0
    while i < len(tokens):
        t = tokens[i]
        prev = tokens[i - 1] if i else ("p", "", 0)
        if is_p(t, "{"):
            depth += 1
        elif is_p(t, "}"):
            depth -= 1
            if scope_close and depth == scope_close[-1]:
                scope.pop()
                scope_close.pop()
        elif is_id(t, "mod") and i + 2 < len(tokens) and tokens[i + 1][0] == "id":
            if is_p(tokens[i + 2], "{"):
                scope.append(tokens[i + 1][1])
                scope_close.append(depth)
                depth += 1
                i += 3
                continue
            if is_p(tokens[i + 2], ";"):
                declared.add(tokens[i + 1][1])
        elif is_id(t, "use") and not is_p(prev, "::"):
            public = is_id(prev, "pub") or (is_p(prev, ")") and any(is_id(x, "pub") for x in tokens[max(0, i - 6) : i]))
            leaves = []
            j = parse_use_tree(tokens, i + 1, [], leaves)
            while j < len(tokens) and not is_p(tokens[j], ";"):
                j += 1
            uses.append((leaves, public, list(scope)))
            i = j + 1
            continue
        elif t[0] == "id" and i + 1 < len(tokens) and is_p(tokens[i + 1], "::"):
            if not (is_p(prev, "::") or is_p(prev, "$") or is_p(prev, ".") or is_id(prev, "in")):
                segs, j = [t[1]], i + 1
                while j + 1 < len(tokens) and is_p(tokens[j], "::") and tokens[j + 1][0] == "id":
                    segs.append(tokens[j + 1][1])
                    j += 2
                paths.append(Ref(segs, t[2], list(scope)))
                i = j
                continue
        i += 1
    return uses, paths, declared


# ---------------------------------------------------------------------------------------------
# One crate: files to modules, paths to modules, the graph and its circles.


class Crate:
    def __init__(self, name, root_dir):
        self.name, self.root_dir = name, root_dir
        self.files = {}  # module path (tuple) -> file path
        self.refs = defaultdict(list)  # module -> [Ref]
        self.uses = defaultdict(list)  # module -> [(leaves, public, scope)]
        self.reexports = defaultdict(dict)  # module -> {name: (absolute segments, scope)}
        self.bindings_of = {}  # module -> {(scope, name): absolute segments}
        self.test_only = set()

    def add(self, module, path):
        self.files[module] = path

    def load(self):
        test_children = {}
        for module, path in sorted(self.files.items()):
            with open(path, encoding="utf-8") as f:
                tokens = lex(f.read())
            tokens, children, whole = strip_test_items(tokens)
            if whole:
                self.test_only.add(module)
                continue
            test_children[module] = children
            uses, paths, _ = collect(tokens)
            self.uses[module] = uses
            for ref in paths:
                self.refs[module].append(ref)
        for module, children in test_children.items():
            for child in children:
                self.test_only.update(m for m in self.files if m[: len(module) + 1] == module + (child,))
        for m in self.test_only:
            self.files.pop(m, None)
            self.refs.pop(m, None)
            self.uses.pop(m, None)
        # `use` leaves become refs; names they bind resolve later paths of the same file.
        for module, uses in self.uses.items():
            bindings = {}
            for leaves, public, scope in uses:
                for segs, bound, line in leaves:
                    absolute = self.absolute(module, scope, segs, {})
                    if absolute is None:
                        continue
                    self.refs[module].append(Ref(["crate"] + absolute, line, []))
                    if bound:
                        bindings[(tuple(scope), bound)] = absolute
                        if public and not scope:
                            self.reexports[module][bound] = absolute
            self.bindings_of[module] = bindings

    def absolute(self, module, scope, segs, bindings):
        """Segments relative to the crate root, or None for a path outside the crate."""
        if not segs:
            return None
        here = list(module) + list(scope)
        first, rest = segs[0], segs[1:]
        if first == "crate":
            return list(rest)
        if first in ("self", "super"):
            base = here
            k = 0
            while k < len(segs) and segs[k] in ("self", "super"):
                if segs[k] == "super":
                    if not base:
                        return None
                    base = base[:-1]
                k += 1
            return base + list(segs[k:])
        child = tuple(here) + (first,)
        if any(m[: len(child)] == child for m in self.files) and not scope:
            return here + list(segs)
        if (tuple(scope), first) in bindings:
            return bindings[(tuple(scope), first)] + list(rest)
        if ((), first) in bindings:
            return bindings[((), first)] + list(rest)
        return None

    def resolve(self, absolute, hops=0):
        """The module file a crate-relative path lands in, following named re-exports."""
        k = len(absolute)
        while k > 0 and tuple(absolute[:k]) not in self.files:
            k -= 1
        module = tuple(absolute[:k])
        if module not in self.files:
            return None
        rest = absolute[k:]
        if rest and hops < 16 and rest[0] in self.reexports.get(module, {}):
            target = self.reexports[module][rest[0]] + rest[1:]
            return self.resolve(target, hops + 1) or module
        return module

    def edges(self):
        """{(from, to): (file, line)} with the first reference of each edge."""
        found = {}
        for module in sorted(self.refs):
            bindings = self.bindings_of.get(module, {})
            for ref in sorted(self.refs[module], key=lambda r: r.line):
                absolute = self.absolute(module, ref.scope, ref.segments, bindings)
                if absolute is None:
                    continue
                target = self.resolve(absolute)
                if target is None or related(module, target):
                    continue
                found.setdefault((module, target), (self.files[module], ref.line))
        return found


def related(a, b):
    return a[: len(b)] == b or b[: len(a)] == a


def components(nodes, edges):
    """Tarjan's strongly connected components."""
    succ = defaultdict(list)
    for a, b in edges:
        succ[a].append(b)
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        work = [(v, iter(sorted(succ[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(start, members, edges):
    succ = defaultdict(list)
    for a, b in edges:
        if a in members and b in members:
            succ[a].append(b)
    prev, queue = {}, deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(succ[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return [start]


def name(module):
    return "::".join(module) if module else "crate"


def crates_of(src):
    """Groups the .rs files under src into crates."""
    main = Crate(src, src)
    bins = {}
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for filename in sorted(filenames):
            if not filename.endswith(".rs"):
                continue
            path = os.path.join(dirpath, filename)
            parts = os.path.relpath(path, src).split(os.sep)
            crate = main
            if parts[0] == "bin":
                if len(parts) == 2:
                    key = parts[1][:-3]
                    parts = ["main.rs"]
                else:
                    key = parts[1]
                    parts = parts[2:]
                crate = bins.setdefault(key, Crate(os.path.join(src, "bin", key), src))
            stem = parts[-1][:-3]
            if len(parts) == 1 and stem in ("lib", "main"):
                if stem == "main" and "lib.rs" in filenames and crate is main:
                    continue  # the binary over the library: it sees the library as an extern crate
                module = ()
            elif stem == "mod":
                module = tuple(parts[:-1])
            else:
                module = tuple(parts[:-1]) + (stem,)
            crate.add(module, path)
    return [main] + [bins[k] for k in sorted(bins)]


def check(src):
    """Prints the circles of the crates in src; returns (circles, modules, edges)."""
    circles = modules = edge_count = 0
    for crate in crates_of(src):
        crate.load()
        edges = crate.edges()
        modules += len(crate.files)
        edge_count += len(edges)
        for comp in components(crate.files.keys(), edges):
            if len(comp) < 2:
                continue
            circles += 1
            members = set(comp)
            print(f"{crate.name}: import circle of {len(comp)} modules:")
            for m in comp:
                print(f"    {name(m):<28} {crate.files[m]}")
            print("  references between them:")
            for (a, b), (path, line) in sorted(edges.items()):
                if a in members and b in members:
                    print(f"    {name(a)} -> {name(b)}  ({path}:{line})")
            cycle = shortest_cycle(comp[0], members, edges)
            print("  one circle: " + " -> ".join(name(m) for m in cycle))
            print()
    return circles, modules, edge_count


def main(argv):
    if len(argv) < 2 or any(a.startswith("-") for a in argv[1:]):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    total, summary = 0, []
    for src in argv[1:]:
        if not os.path.isdir(src):
            print(f"module-cycles: {src} is not a directory", file=sys.stderr)
            return 2
        circles, modules, edges = check(src)
        total += circles
        summary.append(f"{src} ({modules} modules, {edges} edges)")
    if total:
        print(f"module-cycles: {total} import circle(s) found")
        return 1
    print("module-cycles: no import circles in " + ", ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
