"""What a module's forward computes, as a comparable value: its source's syntax tree with what
does not change the computation normalized away (used by `fastnorm.convert` to recognize norm
layers by their code, not their name).

A `Fingerprint` is the normalized tree of a class's `forward`:
- docstrings, bare string statements, comments, type annotations and f-string texts are dropped;
- local variables and arguments are renamed by order of first use, so names do not matter;
- attributes of `self` are renamed by order of first use too, and listed in that order: two
  fingerprints that match bind one's attributes to the other's (`roles`), so `self.eps` in
  one form recognizes `self.variance_epsilon` in another. `self.training` keeps its name;
- a method of the class called on `self` (`self._norm(x)`) is replaced by its own
  fingerprint (sharing the attribute numbering); `super().f(...)` by the function it reaches;
- global names are resolved to the objects they denote, through modules and classes
  (`F.rms_norm`, `torch.nn.functional.rms_norm` and an imported `rms_norm` are the same
  token; a global that names something else is a different token);
- spellings with identical results are unified: `x.float()` = `x.to(torch.float32)`,
  `x.to(dtype=d)` = `x.to(d)`, `x.type_as(y)` = `x.to(y.dtype)`;
- a local assigned and read once, by the next statement, which rebinds it or returns, is folded
  into that read: `x = f(x); x = g(x); return x` = `return g(f(x))` (see `_fold`);
- timm 0.6's `timm.models.layers` is named as its later path `timm.layers` (the same objects,
  moved in timm 0.9), so one form covers both.
Everything else (the operations, their order, constants, keyword names, branches, and which
results a variable is reused for) is kept: two forwards match only if they compute the same thing
in the same way.
"""
from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

# Attributes whose name is their meaning (nn.Module's own): never renamed.
_FIXED_ATTRIBUTES = frozenset({"training"})
_MAX_INLINE_DEPTH = 3


@dataclass(frozen=True)
class Fingerprint:
    """The normalized syntax tree (`text`) of a forward, and the `self` attributes it reads in
    order of first use (`attributes`; renamed in `text`)."""

    text: str
    attributes: tuple[str, ...]


class Foreign:
    """Stands, in fastnorm's own forms, for an object of a library fastnorm does not import
    (timm's `fast_layer_norm`, diffusers' `is_torch_npu_available`): its token is the
    `module.qualname` that the library's object has."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __repr__(self) -> str:
        return f"Foreign({self.qualname!r})"


# Library modules that moved between releases -> their later path (the objects are the same).
_MOVED_MODULES = (("timm.models.layers.", "timm.layers."),)


def _module_path(name: str) -> str:
    for old, new in _MOVED_MODULES:
        if (name + ".").startswith(old):
            return new + name[len(old):]
    return name


def _token(obj: Any) -> Optional[str]:
    """A name for a resolved global that is the same wherever the object is reached from."""
    if isinstance(obj, Foreign):
        return obj.qualname
    if isinstance(obj, types.ModuleType):
        return _module_path(obj.__name__)
    if isinstance(obj, torch.dtype):
        return str(obj)
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{_module_path(module)}.{qualname}"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return repr(obj)
    return None


def _function_tree(func: types.FunctionType) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    node = tree.body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise TypeError("not a function definition")
    return node


def _local_names(node: ast.AST) -> set[str]:
    """Names bound inside a function (arguments, assignments, imports, loop and `with`
    targets, nested definitions): the rest are globals."""
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg):
            names.add(sub.arg)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            names.add(sub.id)
        elif isinstance(sub, ast.alias):
            names.add((sub.asname or sub.name).split(".")[0])
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and sub is not node:
            names.add(sub.name)
        elif isinstance(sub, ast.ExceptHandler) and sub.name:
            names.add(sub.name)
    return names


def _attribute_chain(node: ast.AST) -> Optional[list[str]]:
    """["F", "rms_norm"] for `F.rms_norm`; None if the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


class _Normalizer(ast.NodeTransformer):
    """Rewrites one function's tree in place (see the module docstring)."""

    def __init__(self, owner: type, func: types.FunctionType, tree: ast.FunctionDef,
                 attributes: dict[str, str], depth: int) -> None:
        self.owner = owner                 # the class whose MRO `self` methods come from
        self.func = func
        self.depth = depth
        self.attributes = attributes       # self attribute -> placeholder, shared with helpers
        self.local_names = _local_names(tree)
        self.renamed: dict[str, str] = {}
        args = tree.args.posonlyargs + tree.args.args
        self.self_name = args[0].arg if args else None
        closure = dict(zip(func.__code__.co_freevars,
                           (c.cell_contents for c in func.__closure__ or ())))
        self.namespace = {**func.__globals__, **closure}

    # -- names ---------------------------------------------------------------------------------
    def _local(self, name: str) -> str:
        if name == self.self_name:
            return "self"
        if name not in self.renamed:
            self.renamed[name] = f"v{len(self.renamed)}"
        return self.renamed[name]

    def _global(self, chain: list[str]) -> tuple[str, list[str]]:
        """The token of the longest resolvable prefix of a global attribute chain, and the
        attributes left over."""
        head = chain[0]
        if head in self.namespace:
            obj = self.namespace[head]
        elif hasattr(builtins, head):
            obj = getattr(builtins, head)
        else:
            return "?" + head, chain[1:]
        used = 1
        while used < len(chain) and isinstance(obj, (types.ModuleType, type)) \
                and hasattr(obj, chain[used]):
            obj = getattr(obj, chain[used])
            used += 1
        token = _token(obj)
        if token is None:
            return "?" + ".".join(chain[:used]), chain[used:]
        return token, chain[used:]

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id.startswith("@"):  # a token already
            return node
        if node.id in self.local_names:
            return ast.Name(id=self._local(node.id), ctx=node.ctx)
        token, _rest = self._global([node.id])
        return ast.Name(id="@" + token, ctx=node.ctx)

    def visit_arg(self, node: ast.arg) -> ast.AST:
        return ast.arg(arg=self._local(node.arg), annotation=None)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        chain = _attribute_chain(node)
        if chain is not None and chain[0] == self.self_name and len(chain) >= 2:
            return self._self_attribute(node, chain)
        if chain is not None and chain[0] not in self.local_names:
            token, rest = self._global(chain)
            out: ast.AST = _token_name(token)
            for attr in rest:
                out = ast.Attribute(value=out, attr=attr, ctx=ast.Load())
            if isinstance(out, ast.Attribute):
                out.ctx = node.ctx
            return out
        return self.generic_visit(node)

    def _self_attribute(self, node: ast.Attribute, chain: list[str]) -> ast.AST:
        # Rebuild `self.<attr>` (normalized), then the attributes read from it.
        name = chain[1]
        method = self._method(name)
        if method is not None:
            head: ast.AST = _token_name("method:" + method)
        else:
            if name not in _FIXED_ATTRIBUTES and name not in self.attributes:
                self.attributes[name] = f"a{len(self.attributes)}"
            head = ast.Attribute(value=ast.Name(id="self", ctx=ast.Load()),
                                 attr=self.attributes.get(name, name), ctx=ast.Load())
        for attr in chain[2:]:
            head = ast.Attribute(value=head, attr=attr, ctx=ast.Load())
        head.ctx = node.ctx
        return head

    def _method(self, name: str) -> Optional[str]:
        """The fingerprint text of `self.<name>` if it is a plain method of the class defined
        outside torch (inlined, so that helpers such as `_norm` are compared too)."""
        try:
            value = inspect.getattr_static(self.owner, name)
        except AttributeError:
            return None
        if not isinstance(value, types.FunctionType):
            return None
        if value.__module__.startswith("torch."):
            return "torch:" + value.__qualname__
        if self.depth >= _MAX_INLINE_DEPTH:
            raise ValueError(f"methods nested deeper than {_MAX_INLINE_DEPTH} calls")
        return _normalize(self.owner, value, self.attributes, self.depth + 1)

    # -- calls: super() and the spellings unified -----------------------------------------------
    def visit_Call(self, node: ast.Call) -> ast.AST:
        func = node.func
        method = func.attr if isinstance(func, ast.Attribute) else None
        if (method is not None and isinstance(func.value, ast.Call)
                and isinstance(func.value.func, ast.Name) and func.value.func.id == "super"
                and not func.value.args):
            node = ast.Call(func=_token_name("super:" + self._super(method)),
                            args=[ast.Name(id=self.self_name or "self", ctx=ast.Load()),
                                  *node.args], keywords=node.keywords)
        elif method == "float" and not node.args and not node.keywords:
            node = ast.Call(func=ast.Attribute(value=func.value, attr="to", ctx=ast.Load()),
                            args=[_token_name(str(torch.float32))], keywords=[])
        elif method == "to" and not node.args and len(node.keywords) == 1 \
                and node.keywords[0].arg == "dtype":
            node = ast.Call(func=func, args=[node.keywords[0].value], keywords=[])
        elif method == "type_as" and len(node.args) == 1 and not node.keywords:
            node = ast.Call(func=ast.Attribute(value=func.value, attr="to", ctx=ast.Load()),
                            args=[ast.Attribute(value=node.args[0], attr="dtype",
                                                ctx=ast.Load())], keywords=[])
        return self.generic_visit(node)

    def _super(self, name: str) -> str:
        mro = self.owner.__mro__
        definer = next((k for k in mro if self.func in vars(k).values()), self.owner)
        for klass in mro[mro.index(definer) + 1:]:
            if name in vars(klass):
                return _token(vars(klass)[name]) or "?"
        return "?"

    # -- what does not change the computation -----------------------------------------------------
    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.name = "f"
        node.returns = None
        node.type_comment = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> Optional[ast.AST]:
        if node.value is None:
            return None
        return self.visit(ast.Assign(targets=[node.target], value=node.value, lineno=0))

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        return ast.Constant(value="<f-string>")

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for field in ("body", "orelse", "finalbody"):
            value = getattr(node, field, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                setattr(node, field, _strip_strings(value) or [ast.Pass()])
        return super().generic_visit(node)


def _token_name(token: str) -> ast.Name:
    return ast.Name(id="@" + token, ctx=ast.Load())


def _strip_strings(body: list[ast.stmt]) -> list[ast.stmt]:
    """Drops docstrings and other bare string statements (no-ops)."""
    return [s for s in body
            if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                    and isinstance(s.value.value, str))]


# -- folding single-use assignments ---------------------------------------------------------------
# Expressions whose position in a statement is not simply "evaluated in order, once": a read
# inside one is never folded into (it may run conditionally, repeatedly, or in another scope).
_OPAQUE = (ast.Lambda, ast.IfExp, ast.BoolOp, ast.NamedExpr, ast.Dict, ast.Set, ast.ListComp,
           ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Await, ast.Yield, ast.YieldFrom,
           ast.Starred)
_PURE = (ast.Name, ast.Attribute, ast.Constant, ast.Slice, ast.Tuple)
_PROTECTING = (ast.Try, ast.With, ast.AsyncWith) + ((ast.TryStar,) if hasattr(ast, "TryStar")
                                                    else ())


def _is_super(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "super" and not node.args and not node.keywords)


def _sole_early_read(node: ast.AST, name: str) -> Optional[ast.Name]:
    """The read of `name` in `node` if it is the only one and nothing but names, attributes,
    constants (and `super()`) is evaluated before it, in Python's order; else None."""
    reads: list[ast.Name] = []
    operation_before = False

    def walk(n: ast.AST) -> bool:   # False: give up
        nonlocal operation_before
        if isinstance(n, _OPAQUE):
            return False
        if isinstance(n, ast.Name) and n.id == name:
            if operation_before or not isinstance(n.ctx, ast.Load):
                return False
            reads.append(n)
            return True
        if _is_super(n):
            return True
        for child in ast.iter_child_nodes(n):   # (field order is evaluation order here)
            if not walk(child):
                return False
        if not isinstance(n, _PURE) and isinstance(n, ast.expr):
            operation_before = True           # a call, an operator, an index: done before
        return True

    return reads[0] if walk(node) and len(reads) == 1 else None


def _fold(body: list[ast.stmt], fixed: set[str]) -> list[ast.stmt]:
    """`v = E` followed by `v = g(v)` or `return g(v)` becomes `v = g(E)` / `return g(E)`,
    repeatedly, in every block. Sound where it applies: the old value of v is read only there
    (that statement rebinds v or returns), and before that read only names, attributes and
    constants are evaluated, so E is still evaluated once, before every operation that
    followed it. Not applied to `fixed` names (`self`, `global`/`nonlocal` names, names a
    nested scope reads) nor inside `try` and `with` bodies (where an exception raised after E
    could be caught and the variable read)."""
    body = _strip_strings(body)
    out: list[ast.stmt] = []
    for stmt in body:
        protected = isinstance(stmt, _PROTECTING)
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(stmt, field, None)
            if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                if not (protected and field == "body"):
                    inner = _fold(inner, fixed) or [ast.Pass()]
                setattr(stmt, field, inner)
        for handler in getattr(stmt, "handlers", ()):
            handler.body = _fold(handler.body, fixed) or [ast.Pass()]
        while out and _fold_into(out[-1], stmt, fixed):
            out.pop()
        out.append(stmt)
    return out


def _assigned_name(stmt: ast.stmt) -> Optional[str]:
    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None and stmt.simple:
        target = stmt.target
    elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target = stmt.targets[0]
    else:
        return None
    return target.id if isinstance(target, ast.Name) else None


def _fold_into(prev: ast.stmt, stmt: ast.stmt, fixed: set[str]) -> bool:
    """Folds `prev` (`v = E`) into `stmt` in place if `_fold`'s rule allows it."""
    name = _assigned_name(prev)
    if name is None or name in fixed or any(isinstance(n, ast.NamedExpr)
                                             for n in ast.walk(prev.value)):
        return False
    if isinstance(stmt, ast.Return) and stmt.value is not None:
        holder = stmt
    elif _assigned_name(stmt) == name:
        holder = stmt
    else:
        return False
    read = _sole_early_read(holder.value, name)
    if read is None:
        return False
    if holder.value is read:
        holder.value = prev.value
    else:
        for parent in ast.walk(holder.value):
            for field, value in ast.iter_fields(parent):
                if value is read:
                    setattr(parent, field, prev.value)
                elif isinstance(value, list) and any(v is read for v in value):
                    setattr(parent, field, [prev.value if v is read else v for v in value])
    return True


def _normalize(owner: type, func: types.FunctionType, attributes: dict[str, str],
               depth: int) -> str:
    tree = _function_tree(func)
    args = tree.args.posonlyargs + tree.args.args
    scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp,
              ast.SetComp, ast.DictComp, ast.GeneratorExp)
    fixed = {a.arg for a in args[:1]}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            fixed.update(node.names)
        elif isinstance(node, scopes) and node is not tree:
            fixed.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
    tree.body = _fold(tree.body, fixed) or [ast.Pass()]
    tree = _Normalizer(owner, func, tree, attributes, depth).visit(tree)
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def fingerprint(cls: type, name: str = "forward") -> Union[Fingerprint, str]:
    """The fingerprint of `cls.<name>`, or a string saying why there is none (the source
    cannot be read: a compiled, generated or wrapped function)."""
    func = inspect.getattr_static(cls, name, None)
    if not isinstance(func, types.FunctionType):
        return f"its {name} is not a plain Python function"
    attributes: dict[str, str] = {}
    try:
        text = _normalize(cls, func, attributes, 0)
    except (OSError, TypeError, SyntaxError, ValueError, IndentationError) as exc:
        return f"the source of its {name} cannot be read ({type(exc).__name__}: {exc})"
    return Fingerprint(text, tuple(attributes))
