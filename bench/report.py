"""Turn the samples into the result: medians, ours/bare ratios, the issue's targets, a table, JSON.

A target is reported as met or not; nothing fails on a timing. ``None`` means "not measured".
"""

import statistics

# (row id, operation, cache state of the samples or None for all, label, bare side, target text,
#  check(ours, bare, row) -> bool or None)
ROWS = [
    ("db_backup", "db_backup", None, "database backup, default compression vs same flags", "bare", "<= 1.1x",
     lambda o, b, r: r["ratio"] <= 1.1),
    ("db_backup_vs_gzip", "db_backup", None, "database backup vs pg_basebackup -z (gzip)", "bare_gzip",
     "<= 0.33x, size <=", lambda o, b, r: r["ratio"] <= 1 / 3.0 and r["ours_size"] <= r["bare_size"]),
]
for _op, _what in (("snapshot_1pct", "1% new files"), ("snapshot_nochange", "no change")):
    for _cache in ("cold", "warm"):
        ROWS.append(("%s_%s" % (_op, _cache), _op, _cache, "nightly snapshot, %s, %s cache" % (_what, _cache),
                     "bare", "<= 0.8x", lambda o, b, r: r["ratio"] <= 0.8))
        ROWS.append(("%s_%s_floor" % (_op, _cache), _op, _cache,
                     "nightly snapshot, %s, %s cache, vs the floor" % (_what, _cache), "floor", "<= 1.15x",
                     lambda o, b, r: r["ratio"] <= 1.15))
        ROWS.append(("%s_%s_floor_sync" % (_op, _cache), _op, _cache,
                     "nightly snapshot, %s, %s cache, vs the durable floor" % (_what, _cache), "floor_sync", "-",
                     None))
ROWS += [
    ("retention_delete", "retention_delete", None, "retention delete of one snapshot", "bare", "<= 1.0x",
     lambda o, b, r: r["ratio"] <= 1.0),
    ("btrfs_1pct", "btrfs_1pct", None, "btrfs: nightly snapshot, 1% new files", "bare", "<= 0.2x",
     lambda o, b, r: r["ratio"] <= 0.2),
    ("btrfs_delete", "btrfs_delete", None, "btrfs: retention delete of one snapshot", "bare", "<= 0.1x",
     lambda o, b, r: r["ratio"] <= 0.1),
    ("restore_postgres", "restore_postgres", None, "restore (ours: restore.py postgres --immediate --start)",
     "bare", "<= 1.3x", lambda o, b, r: r["ratio"] <= 1.3),
    ("restore_drill", "restore_drill", None, "restore drill (ours: restore.py verify, every check)", "bare",
     "<= 2x", lambda o, b, r: r["ratio"] <= 2.0),
    ("nightly_overhead", "nightly_overhead", None, "whole nightly run overhead beyond stages", None, "<= 1 s",
     lambda o, b, r: o <= 1.0),
    ("snapshot_full", "snapshot_full", None, "first contentstore copy", "bare", "< 1.0x",
     lambda o, b, r: r["ratio"] < 1.0),
    ("offsite_full", "offsite_full", None, "off-site upload of everything (loopback S3)", "bare", "<= 1.1x",
     lambda o, b, r: r["ratio"] <= 1.1),
    ("offsite_1pct", "offsite_1pct", None, "off-site upload, 1% new night", "bare", "<= 0.5x",
     lambda o, b, r: r["ratio"] <= 0.5),
]
BARE_TOOLS = {
    "db_backup": "pg_basebackup with our flags", "db_backup_vs_gzip": "pg_basebackup, our flags but -z",
    "retention_delete": "rm -rf", "restore_drill": "tar -x + postgres until pg_isready",
    "restore_postgres": "tar -x + postgres until pg_isready",
    "snapshot_full": "one rsync -a", "btrfs_1pct": "rsync -a --link-dest (on the btrfs)",
    "btrfs_delete": "rm -rf (on the btrfs)",
    "offsite_full": "rclone copy of the same directories",
    "offsite_1pct": "rclone copy of the whole snapshot tree",
}
for _row in ROWS:
    if _row[0].startswith("snapshot_") and _row[0] != "snapshot_full":
        BARE_TOOLS[_row[0]] = "cp -al of the previous snapshot" if _row[0].endswith("_floor") else \
            "cp -al, then sync -f" if _row[0].endswith("_floor_sync") else "rsync -a --link-dest"


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


def run_ratios(samples, bare_side):
    """ours/bare of each run that has one successful sample of each side ([float], in run order): the
    paired view of a row whose runs differ on purpose (each night links to a different previous snapshot),
    beside the table's ratio of medians."""
    by_run = {}
    for sample in samples:
        if sample.get("ok", True) and sample["side"] in ("ours", bare_side):
            by_run.setdefault(sample["run"], {}).setdefault(sample["side"], []).append(sample["seconds"])
    return [sides["ours"][0] / sides[bare_side][0] for _run, sides in sorted(by_run.items())
            if len(sides.get("ours", ())) == 1 and len(sides.get(bare_side, ())) == 1 and sides[bare_side][0]]


def build_rows(samples):
    """The table rows (list of dicts) from ``{op: [sample]}``."""
    rows = []
    for row_id, op, cache, label, bare_side, target, check in ROWS:
        op_samples = [s for s in samples.get(op, []) if cache is None or s.get("cache", "cold") == cache]
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
            row["run_ratios"] = run_ratios(op_samples, bare_side)
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


def machine_line(result):
    """One line naming the machine and tools a table was measured with (printed beside every table)."""
    machine = result["machine"]
    server = (result.get("basebackup_plan") or {}).get("server_num")
    tools = "; ".join("%s" % machine[t] for t in ("rsync", "cp", "tar", "zstd", "btrfs") if machine.get(t))
    return ("Machine: %s cores (%s), %.0f GB RAM, kernel %s, %s on %s; PostgreSQL %s; Python %s; %s" % (
        machine.get("nproc"), ", ".join(filter(None, (machine.get("cpu"), machine.get("cpu_detail")))),
        (machine.get("memory_bytes") or 0) / 2 ** 30,
        machine.get("kernel"), machine.get("workdir_fs"), machine.get("workdir"),
        "%d.%d" % (server // 10000, server % 10000) if server else "?", machine.get("python"), tools))


def results_section(result, title="<what changed>"):
    """A ready-to-paste bench/RESULTS.md entry (str): heading, command, machine, dataset, table, notes."""
    machine, data = result["machine"], result["dataset"]
    plan = result.get("basebackup_plan") or {}
    lines = [
        "## %s — %s (commit %s%s)" % (result["date"][:10], title, machine.get("git_commit"),
                                       ", with local changes" if machine.get("git_modified") else ""),
        "",
        "- Command: `%s`; %s run(s) per side, %.0f s in all; page cache dropped before every sample: %s" % (
            result["command"], result["options"]["runs"], result.get("total_s") or 0,
            {True: "yes", False: "NO (warm cache)", None: "-"}[result.get("cold_cache")]),
        "- " + machine_line(result),
        "- Dataset: %s files, %.2f GB, %s directories, %s files of 2-10 MB; %s new files per 1%% night; "
        "pgbench scale %s = %.0f MB database; default PG_COMPRESSION=%s" % (
            "{:,}".format(data["files"]), data["bytes"] / 1e9, "{:,}".format(data["dirs"]), data["large_files"],
            data.get("new_files_per_night"), data["db_scale"], (data.get("pgbench_database_bytes") or 0) / 1e6,
            plan.get("compression_option", "?")),
        "",
        result["markdown"],
    ]
    paired = ["%s: %s" % (row["label"], " / ".join("%.2f" % r for r in row["run_ratios"]))
              for row in result.get("rows") or []
              if row.get("met") is not None and len(row.get("run_ratios") or ()) > 1]
    if paired:
        lines += ["", "- ours/bare of each run (same run, back to back): " + "; ".join(paired)]
    extra = list(result.get("notes") or []) + ["FAILED %s: %s" % (e["section"], e["error"].splitlines()[0])
                                               for e in result.get("errors") or []]
    if extra:
        lines += [""] + ["- %s" % note.splitlines()[0][:300] for note in extra]
    return "\n".join(lines) + "\n"
