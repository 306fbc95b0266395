"""YAML a user wrote, read without surprises.

``yaml.safe_load`` never runs code, but three things it allows still hurt a tool that walks
the result: aliases that expand a 1 kB file into 10^10 values (a "billion laughs" document,
which holds a core forever in any later walk or ``repr``), anchors that refer to themselves
(an infinite structure), and nesting deep enough to exhaust Python's stack. And YAML lets a
key appear twice in one mapping, the later value silently winning. Here each of these is a
:class:`~clpeft.errors.UserError` naming the source (with line and column where YAML gives one).
"""

from __future__ import annotations

import yaml

from clpeft.errors import UserError

__all__ = ["MAX_VALUES", "MalformedYAML", "load_yaml"]

# Values (scalars and collections, aliases counted each time they are used) a document may
# expand to: a run config holds a few hundred.
MAX_VALUES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class MalformedYAML(UserError):
    """The text is not YAML at all (as opposed to YAML that is refused)."""


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing a key that appears twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue  # '<<' merges may override on purpose
                key = self.construct_object(key_node)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first given on line {first[key].line + 1}); the later value would silently win: keep one",
                        key_node.start_mark,
                    )
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _expanded_size(root: yaml.Node, source: str) -> int:
    """How many values ``root`` stands for once aliases are expanded; refuses cycles."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise UserError(f"{source}:{node.start_mark.line + 1}: an anchor refers to itself (an infinite structure)")
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in node.value)
        else:
            total = 1
        open_nodes.discard(key)
        sizes[key] = total
        if total > MAX_VALUES:
            raise UserError(
                f"{source}: expands to more than {MAX_VALUES:,} values through its aliases (*name); "
                f"write the values out or use fewer aliases"
            )
        return total

    return size(root)


def load_yaml(text: str, source: str):
    """Parse one YAML document (``None`` when empty); ``source`` names it in errors.

    Raises:
        UserError: malformed YAML (with line and column), a duplicate key, nesting deeper than
            Python's stack, an anchor that refers to itself, or more than :data:`MAX_VALUES`
            values after expanding aliases.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source)
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as exc:  # well-formed, but refused (a duplicate key)
        raise UserError(f"{_where(exc, source)}: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        raise MalformedYAML(f"{_where(exc, source)}: malformed YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise MalformedYAML(f"{source}: malformed YAML: {exc}") from None
    except RecursionError:
        raise UserError(
            f"{source}: nested too deeply to read (more levels of lists or mappings than Python's stack allows); flatten it"
        ) from None
    finally:
        loader.dispose()


def _where(exc: yaml.MarkedYAMLError, source: str) -> str:
    mark = exc.problem_mark
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
