"""The text of ``env.example`` and of the README's option table, generated from ``config.OPTIONS``.

``python config.py --env-example`` / ``--markdown`` print them; tests/test_docs.py keeps the files in sync.
"""

from config import OPTIONS


def env_example():
    """The text of ``env.example``, generated from the option table."""
    lines = ["# Alfresco backup configuration. Copy to .env (chmod 600) and edit, or run: python3 setup.py",
             "# Generated from the option table in config.py (python config.py --env-example).", ""]
    for name, _kind, default, required, description, secret in OPTIONS:
        lines.append("# %s%s" % (description, " (required)" if required else ""))
        if secret:
            lines.append("# secret: never shown in logs or mails")
        lines.append("%s=%s" % (name, default or ""))
        lines.append("")
    return "\n".join(lines)


def markdown_table():
    """The README's option table, generated from the option table."""
    rows = ["| Key | Type | Default | Required | Description |", "|---|---|---|---|---|"]
    for name, kind, default, required, description, secret in OPTIONS:
        kind = kind.replace("choice:", "one of ").replace("|", ", ")
        rows.append("| `%s` | %s | %s | %s | %s%s |" % (
            name, kind, "`%s`" % default if default else "", "yes" if required else "", description,
            " (secret)" if secret else ""))
    return "\n".join(rows)
