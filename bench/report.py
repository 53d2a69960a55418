"""Turn the samples into the result: medians, ours/bare ratios, the issue's targets, a table, JSON.

A target is reported as met or not; nothing fails on a timing. ``None`` means "not measured".
"""

import statistics

# (row id, operation, label, bare side, target text, check(ours, bare, row) -> bool or None)
ROWS = [
    ("db_backup", "db_backup", "database backup, default compression vs same flags", "bare", "<= 1.1x",
     lambda o, b, r: r["ratio"] <= 1.1),
    ("db_backup_vs_gzip", "db_backup", "database backup vs pg_basebackup -z (gzip)", "bare_gzip",
     "<= 0.33x, size <=", lambda o, b, r: r["ratio"] <= 1 / 3.0 and r["ours_size"] <= r["bare_size"]),
    ("snapshot_1pct", "snapshot_1pct", "nightly snapshot, 1% new files", "bare", "<= 0.7x",
     lambda o, b, r: r["ratio"] <= 0.7),
    ("snapshot_nochange", "snapshot_nochange", "nightly snapshot, no change", "bare", "<= 0.6x",
     lambda o, b, r: r["ratio"] <= 0.6),
    ("retention_delete", "retention_delete", "retention delete of one snapshot", "bare", "<= 1.0x",
     lambda o, b, r: r["ratio"] <= 1.0),
    ("restore_drill", "restore_drill", "restore drill (ours: restore.py verify)", "bare", "-", None),
    ("nightly_overhead", "nightly_overhead", "whole nightly run overhead beyond stages", None, "<= 1 s",
     lambda o, b, r: o <= 1.0),
    ("snapshot_full", "snapshot_full", "first contentstore copy (1 sample)", "bare", "-", None),
    ("offsite_full", "offsite_full", "off-site upload of everything (loopback S3)", "bare", "<= 1.1x",
     lambda o, b, r: r["ratio"] <= 1.1),
    ("offsite_1pct", "offsite_1pct", "off-site upload, 1% new night", "bare", "<= 0.5x",
     lambda o, b, r: r["ratio"] <= 0.5),
]
BARE_TOOLS = {
    "db_backup": "pg_basebackup with our flags", "db_backup_vs_gzip": "pg_basebackup, our flags but -z",
    "snapshot_1pct": "rsync -a --link-dest", "snapshot_nochange": "rsync -a --link-dest",
    "retention_delete": "rm -rf", "restore_drill": "tar -x + postgres until pg_isready",
    "snapshot_full": "rsync -a", "offsite_full": "rclone copy of the same directories",
    "offsite_1pct": "rclone copy of the whole snapshot tree",
}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def side_stats(samples, side):
    """{'n', 'median', 'min', 'max', 'median_size'} of ``side``'s successful samples (``ok`` not False),
    or None when it has none."""
    chosen = [s for s in samples if s["side"] == side and s.get("ok", True)]
    if not chosen:
        return None
    seconds = [s["seconds"] for s in chosen]
    return {"n": len(chosen), "median": _median(seconds), "min": min(seconds), "max": max(seconds),
            "median_size": _median([s.get("size_bytes") for s in chosen])}


def build_rows(samples):
    """The table rows (list of dicts) from ``{op: [sample]}``."""
    rows = []
    for row_id, op, label, bare_side, target, check in ROWS:
        op_samples = samples.get(op, [])
        if not op_samples:
            continue
        ours, bare = side_stats(op_samples, "ours"), side_stats(op_samples, bare_side) if bare_side else None
        failed = sum(1 for s in op_samples if s["side"] == "ours" and s.get("ok", True) is False)
        row = {"id": row_id, "label": label, "bare_tool": BARE_TOOLS.get(row_id), "target": target,
               "ours_failed": failed,
               "ours": ours, "bare": bare, "ours_median": ours and ours["median"],
               "bare_median": bare and bare["median"], "ours_size": ours and ours["median_size"],
               "bare_size": bare and bare["median_size"], "ratio": None, "met": None}
        if ours and bare and bare["median"]:
            row["ratio"] = ours["median"] / bare["median"]
        if check is not None and ours and (bare_side is None or row["ratio"] is not None):
            row["met"] = bool(check(row["ours_median"], row["bare_median"], row))
        rows.append(row)
    return rows


def _secs(value):
    return "-" if value is None else "%.2f s" % value


def _ours(row, ours_note):
    if row["ours"]:
        text = _secs(row["ours_median"]) + _size(row["ours_size"])
        return text + (" (%d failed)" % row["ours_failed"] if row["ours_failed"] else "")
    if row["ours_failed"]:
        return "failed (%d runs)" % row["ours_failed"]
    return (ours_note or {}).get(row["id"], "-")


def _size(value):
    if value is None:
        return ""
    return " (%.1f MB)" % (value / 1e6)


def table(rows, ours_note=None):
    """The rows as a fixed-width text table (str)."""
    head = ("operation", "ours (median)", "bare (median)", "ours/bare", "target", "met?")
    lines = []
    for row in rows:
        ours = _ours(row, ours_note)
        bare = _secs(row["bare_median"]) + _size(row["bare_size"]) if row["bare"] else "-"
        ratio = "-" if row["ratio"] is None else "%.2f" % row["ratio"]
        met = "-" if row["met"] is None else ("yes" if row["met"] else "NO")
        lines.append((row["label"], ours, bare, ratio, row["target"], met))
    widths = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in [head] + lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(rows, ours_note=None):
    """The rows as a Markdown table (str), for bench/RESULTS.md."""
    lines = ["| operation | ours (median) | bare (median) | bare tool | ours/bare | target | met? |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        ours = _ours(row, ours_note)
        bare = _secs(row["bare_median"]) + _size(row["bare_size"]) if row["bare"] else "-"
        ratio = "-" if row["ratio"] is None else "%.2f" % row["ratio"]
        met = "-" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (row["label"], ours, bare, row["bare_tool"] or "-",
                                                              ratio, row["target"].replace("<=", "≤"), met))
    return "\n".join(lines)


def results_section(result, title="<what changed>"):
    """A ready-to-paste bench/RESULTS.md entry (str): heading, command, machine, dataset, table, notes."""
    machine, data = result["machine"], result["dataset"]
    plan = result.get("basebackup_plan") or {}
    server = plan.get("server_num")
    lines = [
        "## %s — %s (commit %s%s)" % (result["date"][:10], title, machine.get("git_commit"),
                                       ", with local changes" if machine.get("git_modified") else ""),
        "",
        "- Command: `%s`; %s run(s) per side, %.0f s in all; page cache dropped before every sample: %s" % (
            result["command"], result["options"]["runs"], result.get("total_s") or 0,
            {True: "yes", False: "NO (warm cache)", None: "-"}[result.get("cold_cache")]),
        "- Machine: %s cores (%s), %.0f GB RAM, kernel %s, %s on %s; PostgreSQL %s; Python %s; %s" % (
            machine.get("nproc"), machine.get("cpu"), (machine.get("memory_bytes") or 0) / 2 ** 30,
            machine.get("kernel"), machine.get("workdir_fs"), machine.get("workdir"),
            "%d.%d" % (server // 10000, server % 10000) if server else "?", machine.get("python"),
            machine.get("rsync")),
        "- Dataset: %s files, %.2f GB, %s directories, %s files of 2-10 MB; %s new files per 1%% night; "
        "pgbench scale %s = %.0f MB database; default PG_COMPRESSION=%s" % (
            "{:,}".format(data["files"]), data["bytes"] / 1e9, "{:,}".format(data["dirs"]), data["large_files"],
            data.get("new_files_per_night"), data["db_scale"], (data.get("pgbench_database_bytes") or 0) / 1e6,
            plan.get("compression_option", "?")),
        "",
        result["markdown"],
    ]
    extra = list(result.get("notes") or []) + ["FAILED %s: %s" % (e["section"], e["error"].splitlines()[0])
                                               for e in result.get("errors") or []]
    if extra:
        lines += [""] + ["- %s" % note.splitlines()[0][:300] for note in extra]
    return "\n".join(lines) + "\n"
