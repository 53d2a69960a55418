"""The text of a run's report mail (pure, no I/O): subject, stage table, error, tool output tail.

:func:`build_report` is what every entry point mails through :func:`email_alert.notify`.
"""

from catalog import human_size

SUBJECT_PREFIX = "[alfresco-backup]"
# At most this many lines of a tool's output go into a mail: the end of stderr carries the reason,
# and a mail of megabytes would be rejected or unread.
MAX_TAIL_LINES = 60


def human_duration(seconds):
    """Seconds as ``"4.2 s"``, ``"3 min 07 s"``, ``"2 h 05 min"``; ``"-"`` for None."""
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {(whole % 3600) // 60:02d} min"


def _stage_field(stage, name, default=None):
    if isinstance(stage, dict):
        value = stage.get(name, default)
    else:
        value = getattr(stage, name, default)
    return default if value is None else value


def one_line(text):
    """``text`` with every run of white space (newlines too) made one space."""
    return " ".join(str(text).split())


def _indent(text, prefix="    "):
    return "\n".join(prefix + line for line in str(text).splitlines())


def _tail_text(tail):
    if not tail:
        return ""
    lines = tail.splitlines() if isinstance(tail, str) else [str(line) for line in tail]
    lines = [line.rstrip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) > MAX_TAIL_LINES:
        omitted = len(lines) - MAX_TAIL_LINES
        lines = [f"[... {omitted} earlier lines omitted ...]"] + lines[-MAX_TAIL_LINES:]
    return "\n".join(lines)


def _stage_table(stages):
    header = ("Stage", "Status", "Duration", "Size", "Detail")
    rows = [(s["name"], s["status"], human_duration(s["duration"]), human_size(s["size"]),
             one_line(s["detail"])) for s in stages]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(4)]
    lines = []
    for row in [header, tuple("-" * w for w in widths) + ("------",)] + rows:
        cells = [row[i].ljust(widths[i]) if i < 2 else row[i].rjust(widths[i]) for i in range(4)]
        lines.append(("  " + "  ".join(cells) + "  " + row[4]).rstrip())
    return "\n".join(lines)


def build_report(hostname, ok, stages, error=None, tool_output_tail="", log_path=None, extra_sections=None):
    """Subject and plain-text body describing one run. Pure: no I/O, no clock.

    Inputs: ``hostname``; ``ok`` (the run's overall result); ``stages``, a list of dicts or objects with
    ``name``, ``status`` ("OK"/"WARN"/"FAILED"/"SKIPPED"), ``duration`` (seconds or None), ``size``
    (bytes or None), ``detail`` (what the stage did or was doing); ``error`` (the failure's text);
    ``tool_output_tail`` (str or list of lines, last lines of the failing tool's output; at most
    MAX_TAIL_LINES are kept); ``log_path``; ``extra_sections``, a list of ``(title, text)``.
    Output: ``(subject, body)``. Raises nothing for well-formed input.
    """
    views = [{"name": str(_stage_field(s, "name", "?")),
              "status": str(_stage_field(s, "status", "?")).upper(),
              "duration": _stage_field(s, "duration"),
              "size": _stage_field(s, "size"),
              "detail": str(_stage_field(s, "detail", ""))} for s in (stages or ())]
    failed = [s for s in views if s["status"] == "FAILED"]
    warned = [s for s in views if s["status"] == "WARN"]
    host = one_line(hostname or "unknown host")

    if not ok:
        verdict = "FAILED"
        subject = f"{SUBJECT_PREFIX} FAILED on {host}"
        if failed:
            subject += ": " + failed[0]["name"]
    elif warned:
        verdict = "OK with warnings"
        subject = f"{SUBJECT_PREFIX} OK with warnings on {host}"
    else:
        verdict = "OK"
        subject = f"{SUBJECT_PREFIX} OK on {host}"

    parts = [f"Alfresco backup run on {host}: {verdict}"]
    if not ok:
        lines = []
        if failed:
            lines.append("Failed stage: {}".format(failed[0]["name"]))
            if failed[0]["detail"]:
                lines.append("What it was doing: {}".format(one_line(failed[0]["detail"])))
        if error:
            error_lines = str(error).strip().splitlines() or [""]
            lines.append(f"Error: {error_lines[0]}")
            lines.extend("       " + line for line in error_lines[1:])
        if lines:
            parts.append("\n".join(lines))
    elif error:
        parts.append(f"Note: {str(error).strip()}")
    tail = _tail_text(tool_output_tail)
    if tail:
        parts.append("Last lines of the tool's output:\n" + _indent(tail, "    | "))
    if warned:
        parts.append("Warnings:\n" + "\n".join(
            "  - {}: {}".format(s["name"], one_line(s["detail"]) or "warning") for s in warned))
    if views:
        parts.append("Stages:\n" + _stage_table(views))
    else:
        parts.append("Stages: none ran.")
    if log_path:
        parts.append(f"Log file: {log_path}")
    for title, text in extra_sections or ():
        parts.append(f"== {one_line(title)} ==\n{str(text).rstrip()}")
    return subject, "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- sending
