"""SQL text the way psql handles it, standard library only: statements split at top-level semicolons,
``:'name'``/``:"name"`` variables bound as quoted literals/identifiers (never inside a literal, a quoted
identifier, a comment or a dollar-quoted body), and results printed as ``psql -A -t`` prints them. Used with
pgwire.py by setup.py (setup_db.py), whose callers were written for psql.

API: ``statements(sql, variables) -> [str]``; ``quote_literal(value)``; ``quote_ident(value)``;
``psql_text(results)`` (pgwire Results).
"""

import re


def psql_text(results):
    """The rows of ``results`` as ``psql -A -t`` prints them: fields joined by '|', NULL empty, one line a row."""
    return "\n".join("|".join("" if v is None else v for v in row) for result in results for row in result.rows)


def quote_literal(value):
    """``value`` as an SQL string literal, right whatever standard_conforming_strings says (E'' with doubled
    backslashes when it holds one, as psql's :'name' does). Raises ValueError for a NUL character."""
    text = str(value)
    if "\0" in text:
        raise ValueError("a NUL character cannot be sent to PostgreSQL")
    body = text.replace("'", "''")
    return " E'%s'" % body.replace("\\", "\\\\") if "\\" in text else "'%s'" % body


def quote_ident(value):
    """``value`` as a double-quoted SQL identifier. Raises ValueError for a NUL character or an empty name."""
    text = str(value)
    if "\0" in text or not text:
        raise ValueError("not usable as an SQL identifier: %r" % text)
    return '"%s"' % text.replace('"', '""')


_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$")
_VARIABLE = re.compile(r":(['\"])([A-Za-z0-9_]+)\1")


def _quoted_end(sql, start, quote, backslash_escapes=False):
    at = start + 1
    while at < len(sql):
        if backslash_escapes and sql[at] == "\\":
            at += 2
            continue
        if sql[at] == quote:
            if sql[at + 1:at + 2] != quote:
                return at + 1
            at += 1
        at += 1
    return len(sql)


def _comment_end(sql, start):
    depth, at = 0, start
    while at < len(sql):
        pair = sql[at:at + 2]
        if pair == "/*":
            depth, at = depth + 1, at + 2
        elif pair == "*/":
            depth, at = depth - 1, at + 2
            if depth == 0:
                return at
        else:
            at += 1
    return len(sql)


def _word_char(char):
    return char.isalnum() or char in "_$"


def statements(sql, variables=None):
    """The statements of ``sql`` split at top-level semicolons, with ``:'name'`` and ``:"name"`` replaced by
    the quoted value of ``variables[name]``, the way psql splits and substitutes: never inside a literal, a
    quoted identifier, a comment or a dollar-quoted body. Raises KeyError for a variable with no value,
    ValueError for a value that cannot be quoted."""
    variables = variables or {}
    found, current, meaningful, depth, at = [], [], False, 0, 0
    while at < len(sql):
        char, pair = sql[at], sql[at:at + 2]
        end, comment = at + 1, False
        if char == "'":
            escapes = at > 0 and sql[at - 1] in "eE" and not (at > 1 and _word_char(sql[at - 2]))
            end = _quoted_end(sql, at, "'", escapes)
        elif char == '"':
            end = _quoted_end(sql, at, '"')
        elif pair == "--":
            newline = sql.find("\n", at)
            end, comment = (len(sql) if newline < 0 else newline + 1), True
        elif pair == "/*":
            end, comment = _comment_end(sql, at), True
        elif char == "$" and not (at > 0 and _word_char(sql[at - 1])) and _DOLLAR_TAG.match(sql, at):
            tag = _DOLLAR_TAG.match(sql, at).group(0)
            close = sql.find(tag, at + len(tag))
            end = len(sql) if close < 0 else close + len(tag)
        elif pair == "::":
            end = at + 2
        elif char == ":" and _VARIABLE.match(sql, at):
            match = _VARIABLE.match(sql, at)
            value = variables[match.group(2)]
            current.append(quote_literal(value) if match.group(1) == "'" else quote_ident(value))
            meaningful, at = True, match.end()
            continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif char == ";" and depth == 0:
            if meaningful:
                found.append(("".join(current) + ";").strip())
            current, meaningful, at = [], False, at + 1
            continue
        current.append(sql[at:end])
        meaningful = meaningful or (not comment and not sql[at:end].isspace())
        at = end
    if meaningful:
        found.append("".join(current).strip())
    return found
