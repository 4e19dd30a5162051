"""A chat template cut around its loop over the messages, so that a conversation's next turn
renders only what its new messages add (chunking/chat_resume.py keeps the checkpoints).

A template qualifies when its top level reads `pre`, then `{% for m in messages %}`, then
`post`, and the loop body cannot see where the list ends: it never names `messages` except as
`messages[k]` with a constant k >= 0, and of `loop` it reads only `first`, `index` and `index0`
(the cut loop adds the offset of the messages it starts at). Then iteration i's output and
effects depend only on messages[i], the messages[k] it reads, the template's variables, what
`pre` assigned and the namespaces' state when it starts; chat_resume.py compares or restores
each of those. What reaches past the list's end (`loop.last`, `loop.length`, `messages[-1]`,
`messages | length`, a `{% break %}`) is refused here, so such templates render whole.

Also refused, because the cut could change what they mean: inheritance, includes and imports,
`{% call %}` other than transformers' generation tag, macros inside the loop, names assigned at
the top level after the loop that anything before it reads, `self`, and the stateful or
impure globals (`cycler`, `joiner`, `lipsum`; `strftime_now` inside the loop or a macro).
"""

from __future__ import annotations

from typing import NamedTuple

import jinja2
from jinja2 import nodes

SEGMENT = "irminsul_segment"  # the messages a cut loop iterates over
OFFSET = "irminsul_offset"  # index of the segment's first message in the whole list
_RESERVED = frozenset({SEGMENT, OFFSET})
_ANYWHERE = frozenset({"self", "cycler", "joiner", "lipsum"}) | _RESERVED
_IN_LOOP = frozenset({"strftime_now"})  # time changes between the turns that share a checkpoint
_BANNED = (
    nodes.Extends, nodes.Block, nodes.Include, nodes.Import, nodes.FromImport, nodes.Scope,
    nodes.OverlayScope, nodes.EvalContextModifier, nodes.ExprStmt,
)


class TemplateCut(NamedTuple):
    pre: jinja2.Template  # the statements before the loop
    loop: jinja2.Template  # the loop over SEGMENT, loop indices shifted by OFFSET
    post: jinja2.Template  # the statements after it
    min_prefix: int  # a checkpoint after fewer messages cannot be resumed (messages[k] reads)


class _Refused(Exception):
    pass


def cut_template(env: jinja2.Environment, source: str) -> TemplateCut | str:
    """``source`` cut in three, or why it cannot be (a sentence)."""
    try:
        return _cut(env, env.parse(source))
    except _Refused as e:
        return str(e)
    except jinja2.TemplateSyntaxError as e:
        return f"does not parse: {e}"


def _cut(env, ast: nodes.Template) -> TemplateCut:
    for node in ast.find_all(nodes.Node):
        if isinstance(node, _BANNED):
            raise _Refused(f"uses {type(node).__name__}")
        if isinstance(node, nodes.CallBlock) and not _is_generation(node):
            raise _Refused("uses {% call %}")
        if isinstance(node, nodes.Name) and node.name in _ANYWHERE:
            raise _Refused(f"names {node.name!r}")
    loops = [i for i, n in enumerate(ast.body) if isinstance(n, nodes.For)
             and isinstance(n.iter, nodes.Name) and n.iter.name == "messages"]
    if not loops:
        raise _Refused("has no top-level loop over messages")
    i = loops[-1]
    pre, loop, post = ast.body[:i], ast.body[i], ast.body[i + 1 :]
    if not isinstance(loop.target, nodes.Name) or loop.target.name in ("loop", "messages"):
        raise _Refused("loops with an unusual target")
    if loop.recursive or loop.else_:
        raise _Refused("has a recursive loop or a loop else")
    stored_pre, stored_post = _root_stores(pre), _root_stores(post)
    if "messages" in stored_pre | stored_post:
        raise _Refused("assigns messages")
    if stored_pre & stored_post:
        raise _Refused("assigns a name both before and after the loop")
    body = _Body()
    loop.body = [body.visit(n, main=True) for n in loop.body]
    if loop.test is not None:
        loop.test = body.visit(loop.test, main=True)
        if body.reads_loop:
            raise _Refused("reads loop in a filtered loop")
    for macro in [n for s in pre for n in _self_and_all(s) if isinstance(n, nodes.Macro)]:
        body.visit(macro, main=False)  # the loop may call it: the loop's rules hold in it
    before = {n.name for s in [*pre, loop] for n in _self_and_all(s) if isinstance(n, nodes.Name)}
    if before & stored_post:
        raise _Refused("assigns after the loop a name the loop or what precedes it uses")
    loop.iter = nodes.Name(SEGMENT, "load", lineno=loop.lineno)
    return TemplateCut(_compiled(env, pre), _compiled(env, [loop]), _compiled(env, post),
                       body.max_index + 1)


class _Body:
    """Checks a loop body (or a macro it may call) and shifts its loop indices."""

    def __init__(self):
        self.max_index = -1
        self.reads_loop = False

    def visit(self, node: nodes.Node, main: bool) -> nodes.Node:
        """``main``: `loop` here is the cut loop's."""
        if isinstance(node, nodes.Name):
            if node.name == "messages":
                raise _Refused("reads messages inside the loop other than as messages[k]")
            if node.name in _IN_LOOP:
                raise _Refused(f"calls {node.name} inside the loop")
            if node.name == "loop" and main:
                raise _Refused("uses loop other than loop.first, loop.index, loop.index0")
            return node
        if isinstance(node, nodes.Getitem) and _is_name(node.node, "messages"):
            k = node.arg.value if isinstance(node.arg, nodes.Const) else None
            if type(k) is not int or k < 0:
                raise _Refused("reads messages[...] other than at a constant index >= 0")
            self.max_index = max(self.max_index, k)
            return node
        if main and isinstance(node, nodes.Getattr) and _is_name(node.node, "loop"):
            self.reads_loop = True
            return _shifted(node)
        if isinstance(node, nodes.Break) and main:
            raise _Refused("breaks out of the loop")
        if isinstance(node, nodes.Macro) and main:
            raise _Refused("defines a macro inside the loop")
        if isinstance(node, nodes.For):  # its iter is read out here; the rest is its own scope
            node.iter = self.visit(node.iter, main)
            for part in (node.test, *node.else_):
                if part is not None and any(
                    n.name == "loop" for n in _self_and_all(part) if isinstance(n, nodes.Name)
                ):
                    raise _Refused("reads loop in a loop filter or else")
            node.target = self.visit(node.target, False)
            node.test = None if node.test is None else self.visit(node.test, False)
            node.body = [self.visit(n, False) for n in node.body]
            node.else_ = [self.visit(n, False) for n in node.else_]
            return node
        for field, value in node.iter_fields():
            if isinstance(value, nodes.Node):
                setattr(node, field, self.visit(value, main))
            elif isinstance(value, list):
                setattr(node, field, [self.visit(v, main) if isinstance(v, nodes.Node) else v
                                      for v in value])
        return node


def _shifted(node: nodes.Getattr) -> nodes.Expr:
    """loop.index0 / index / first of the cut loop, counted from the whole list's start."""
    ln = node.lineno

    def attr(name):
        return nodes.Add(nodes.Getattr(nodes.Name("loop", "load", lineno=ln), name, "load",
                                       lineno=ln), nodes.Name(OFFSET, "load", lineno=ln),
                         lineno=ln)

    if node.attr in ("index0", "index"):
        return attr(node.attr)
    if node.attr == "first":
        return nodes.Compare(attr("index0"), [nodes.Operand("eq", nodes.Const(0, lineno=ln),
                                                            lineno=ln)], lineno=ln)
    raise _Refused(f"reads loop.{node.attr}")


def _root_stores(stmts) -> set[str]:
    """Names assigned in the top-level frame (for, with, filter and call blocks are scoped)."""
    out: set[str] = set()
    for n in stmts:
        if isinstance(n, (nodes.Assign, nodes.AssignBlock)):
            out.update(t.name for t in _self_and_all(n.target) if isinstance(t, nodes.Name))
        elif isinstance(n, nodes.Macro):
            out.add(n.name)
        elif isinstance(n, nodes.If):
            out |= _root_stores(n.body) | _root_stores(n.elif_) | _root_stores(n.else_)
    return out


def _self_and_all(node: nodes.Node):
    yield node
    yield from node.find_all(nodes.Node)


def _is_name(node, name: str) -> bool:
    return isinstance(node, nodes.Name) and node.name == name


def _is_generation(node: nodes.CallBlock) -> bool:
    call = node.call
    return (isinstance(call, nodes.Call) and isinstance(call.node, nodes.ExtensionAttribute)
            and call.node.name == "_body" and not call.args and not node.args)


def _compiled(env, body: list) -> jinja2.Template:
    tree = nodes.Template(body, lineno=1)
    tree.set_environment(env)
    return env.template_class.from_code(env, env.compile(tree), env.make_globals(None), None)
