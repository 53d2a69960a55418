#!/usr/bin/env python3
"""Benchmark our nightly stages against the bare tools on a synthetic Alfresco server (``make bench``).

``python bench/run.py [--quick] [--files N] [--db-scale S] [--runs R] [--out PATH] [--keep] [--workdir DIR]
[--only SECTIONS] [--set KEY=VALUE ...] [--new-percent P] [--seed N]``

Builds a sandbox (tests/sandbox.py: real PostgreSQL, service user ``alfbackup``) with a synthetic
contentstore and a pgbench database, then measures, alternating ours and bare with a cold page cache
before each sample: database backup (ours vs pg_basebackup with the same flags and with -z), first
contentstore copy, nightly snapshot with 1% new files and with no change, retention delete of one
snapshot, whole nightly run overhead, restore drill. Prints a table of medians and writes every sample
as JSON. Never fails on a timing; exit 1 when a step itself failed, 2 for bad options or too little disk.
See bench/README.md.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
PROJECT_DIR = os.path.dirname(BENCH_DIR)
for _path in (os.path.join(PROJECT_DIR, "tests"), PROJECT_DIR, BENCH_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import dataset  # noqa: E402
import measure  # noqa: E402
import offsite_bench  # noqa: E402
import report  # noqa: E402
import sandbox as sandbox_module  # noqa: E402

FULL = {"files": 60000, "db_scale": 60, "runs": 3}
QUICK = {"files": 3000, "db_scale": 5, "runs": 3}
SECTIONS = ("full", "db", "snapshot", "btrfs", "overhead", "restore", "offsite")


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Benchmark our backup stages against the bare tools.",
                                     epilog="Defaults: %(files)d files, --db-scale %(db_scale)d, %(runs)d runs; "
                                            "--quick: 3000 files, scale 5, 3 runs." % FULL)
    parser.add_argument("--quick", action="store_true", help="small dataset (~150 MB + ~80 MB database)")
    parser.add_argument("--files", type=int, help="contentstore files (default 60000, ~3.1 GB)")
    parser.add_argument("--db-scale", type=int, help="pgbench scale (default 60, ~900 MB)")
    parser.add_argument("--runs", type=int, help="samples per side and operation (default 3)")
    parser.add_argument("--new-percent", type=float, default=1.0, help="new files per night, %% (default 1)")
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "latest.json"), help="JSON output")
    parser.add_argument("--workdir", default="/tmp", help="where the sandbox is built (default /tmp)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections to measure: %s (default all)" % ",".join(SECTIONS))
    parser.add_argument("--seed", type=int, default=1, help="random seed of the dataset (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the sandbox's backup .env (e.g. CONTENTSTORE_PARALLEL=2, "
                             "PG_COMPRESSION=lz4); repeatable")
    parser.add_argument("--markdown", action="store_true", help="also print a ready-to-paste RESULTS.md entry")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox (server stopped) for inspection")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error("--set wants KEY=VALUE, got %r" % item)
        overrides[key.strip()] = value
    args.set = overrides
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error("unknown section(s) for --only: %s" % ", ".join(unknown))
    if args.files < 1 or args.db_scale < 1 or args.runs < 1 or not 0 < args.new_percent <= 100:
        parser.error("--files, --db-scale and --runs must be >= 1, --new-percent in (0, 100]")
    return args


def machine_info(workdir):
    info = {"nproc": os.cpu_count(), "kernel": platform.release(), "machine": platform.machine(),
            "python": platform.python_version(), "workdir": workdir, "workdir_fs": dataset.fs_type(workdir),
            "euid": os.geteuid()}
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            info["memory_bytes"] = int(handle.readline().split()[1]) * 1024
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpuinfo = dict(line.split(":", 1) for line in handle.read().split("\n\n")[0].splitlines() if ":" in line)
        cpuinfo = {key.strip(): value.strip() for key, value in cpuinfo.items()}
        info["cpu"] = cpuinfo.get("model name")
        # A VM's model name is often just the vendor's ("AMD EPYC"): family, model and clock tell machines of
        # one kind apart in bench/RESULTS.md.
        info["cpu_detail"] = "family %s model %s stepping %s, %.0f MHz" % (
            cpuinfo.get("cpu family"), cpuinfo.get("model"), cpuinfo.get("stepping"),
            float(cpuinfo.get("cpu MHz") or 0))
    except (OSError, ValueError, IndexError):
        pass
    for tool, argv in (("rsync", ["rsync", "--version"]), ("tar", ["tar", "--version"]),
                       ("zstd", ["zstd", "--version"]), ("cp", ["cp", "--version"]),
                       ("btrfs", ["btrfs", "--version"])):
        info[tool] = dataset.tool_version(argv)
    git = ["git", "--no-optional-locks", "-C", PROJECT_DIR]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True)
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], check=False,
                           capture_output=True, text=True)
    info["git_commit"] = head.stdout.strip() or None
    info["git_modified"] = [line[3:] for line in dirty.stdout.splitlines()]
    return info


def write_json(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def build(args, plan, result):
    """The sandbox with its contentstore and pgbench database. Returns (sb, env_path)."""
    root = tempfile.mkdtemp(prefix="alfbench-", dir=args.workdir)
    print("building the sandbox in %s" % root, flush=True)
    sb = sandbox_module.Sandbox.create(root=root, n_files=0)
    try:
        env_path = sb.write_env(**args.set)
        print("writing %d files (%.2f GB, %d directories)" % (len(plan.files), plan.bytes_total / 1e9, len(plan.dirs)),
              flush=True)
        seconds = dataset.write_contentstore(sb.contentstore_dir, plan, args.seed, sb.uid, sb.gid)
        result["dataset"]["contentstore_write_s"] = round(seconds, 3)
        result["dataset"]["contentstore_written_at"] = time.time()
        result["dataset"]["content_rows"] = dataset.insert_rows(sb, plan.files)
        print("pgbench -i -s %d" % args.db_scale, flush=True)
        result["dataset"].update(("pgbench_" + k, v) for k, v in dataset.init_pgbench(sb, args.db_scale).items())
        result["dataset"]["pgdata"] = dataset.tree_stats(sb.pgdata)
        result["machine"]["service_python"] = sb.python
        os.sync()
    except BaseException:
        if args.keep:
            print("kept %s (the build failed)" % sb.root)
        else:
            sb.destroy()
        raise
    return sb, env_path


def run_sections(args, bench, plan, result):
    """Run the selected sections in order. A section that fails is recorded in result['errors'] and the
    next one still runs (most do not depend on it). Returns the number of failed sections."""
    new_files = max(1, int(round(args.files * args.new_percent / 100.0)))
    result["dataset"]["new_files_per_night"] = new_files
    first_new_day = plan.last_day + datetime.timedelta(days=1)
    import contentstore

    def full():
        bench.wait_until_old(result["dataset"]["contentstore_written_at"], contentstore.TRUST_MARGIN_S)
        bench.first_copy(args.runs)

    def base_only():
        bench.wait_until_old(result["dataset"]["contentstore_written_at"], contentstore.TRUST_MARGIN_S)
        bench.worker("snapshot", bench.new_name("contentstore"))

    steps = [
        ("full", "first contentstore copy", full),
        ("db", "database backup", lambda: bench.db_backup(args.runs)),
        ("snapshot", "nightly snapshots and retention deletes",
         lambda: bench.contentstore_nights(args.runs, new_files, first_new_day, args.seed)),
        ("btrfs", "btrfs: nightly snapshots and retention deletes with BACKUP_DIR on a loop-mounted btrfs",
         lambda: bench.btrfs_nights(args.runs, new_files, first_new_day + datetime.timedelta(days=args.runs),
                                    args.seed)),
        ("overhead", "backup.py, whole nights", lambda: bench.nightly_runs(args.runs)),
        ("restore", "restore drill", lambda: bench.restore_drill(args.runs)),
        ("offsite", "off-site upload to a loopback S3 server", lambda: offsite_bench.OffsiteBench(bench).run(
            args.runs, new_files, first_new_day + datetime.timedelta(days=2 * args.runs + 1), args.seed)),
    ]
    if "full" not in args.only and {"snapshot", "overhead"} & set(args.only):
        steps[0] = ("full", "a first snapshot for the nights to link to (untimed)", base_only)
        args.only = ["full"] + args.only
    failed = 0
    for section, title, func in steps:
        if section not in args.only:
            continue
        print("== %s" % title, flush=True)
        try:
            func()
        except Exception as exc:  # recorded with its traceback; the other sections still give numbers
            failed += 1
            result["errors"].append({"section": section, "error": "%s: %s" % (type(exc).__name__, exc),
                                     "traceback": traceback.format_exc()})
            sys.stderr.write("bench: %s failed: %s\n" % (title, exc))
    try:
        result["basebackup_plan"] = bench.basebackup_plan()  # versions and flags, also when "db" did not run
    except Exception as exc:  # reported, not fatal: the measurements are already in
        result["errors"].append({"section": "plan", "error": "%s: %s" % (type(exc).__name__, exc)})
        failed += 1
    return failed


def finish(result, bench, started, out, markdown=False):
    result["samples"] = bench.samples if bench else {}
    result["cold_cache"] = bench.cold_ok if bench else None
    result["notes"] = bench.notes if bench else []
    rows = report.build_rows(result["samples"])
    available = result["machine"].get("restore_verify")
    if available is None:
        available = result["machine"]["restore_verify"] = measure.restore_verify_available()
    ours_note = {} if available else {"restore_drill": "not available yet"}
    result["rows"] = rows
    result["table"] = report.table(rows, ours_note)
    result["markdown"] = report.markdown(rows, ours_note)
    result["total_s"] = round(time.monotonic() - started, 1)
    result["results_md"] = report.results_section(result)
    write_json(out, result)
    print("\n" + report.machine_line(result) + "\n" + result["table"])
    if result["cold_cache"] is False:
        print("note: the page cache could not be dropped (not root?): samples are warm-cache")
    for note in result["notes"]:
        print("note: %s" % note)
    for error in result["errors"]:
        print("FAILED (%s): %s" % (error["section"], error["error"].splitlines()[0][:300]))
    if markdown:
        print("\n" + result["results_md"])
    print("\n%d files, %.2f GB contentstore; database %.0f MB; %d run(s) per side; %.0f s in all. JSON: %s" % (
        result["dataset"]["files"], result["dataset"]["bytes"] / 1e9,
        (result["dataset"].get("pgbench_database_bytes") or 0) / 1e6, result["options"]["runs"],
        result["total_s"], out))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    plan = dataset.plan_contentstore(args.files, args.seed)
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["bench/run.py"] + (sys.argv[1:] if argv is None else list(argv))),
              "options": {k: v for k, v in vars(args).items()}, "machine": machine_info(args.workdir),
              "dataset": {"files": len(plan.files), "bytes": plan.bytes_total, "dirs": len(plan.dirs),
                          "large_files": plan.large_files, "db_scale": args.db_scale, "seed": args.seed},
              "errors": []}
    try:
        space = dataset.check_space(args.workdir, plan.bytes_total, dataset.estimate_db_bytes(args.db_scale),
                                    len(plan.dirs), args.files, args.runs)
    except (dataset.DatasetError, OSError) as exc:
        sys.stderr.write("bench: %s\n" % exc)
        return 2
    result["space"] = space
    print("%s: %.1f GB free, this run needs about %.1f GB; cache dropping %s" % (
        args.workdir, space["free_bytes"] / 1e9, space["need_bytes"] / 1e9,
        "works" if os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK) else "is NOT possible"),
        flush=True)
    sb = bench = None
    code = 0
    try:
        sb, env_path = build(args, plan, result)
        bench = measure.Bench(sb, env_path, env_overrides=args.set)
        code = 1 if run_sections(args, bench, plan, result) else 0
    except (measure.BenchError, dataset.DatasetError, sandbox_module.SandboxError, OSError,
            subprocess.SubprocessError, KeyboardInterrupt) as exc:
        result["errors"].append({"section": "build", "error": "%s: %s" % (type(exc).__name__, exc)})
        sys.stderr.write("bench: %s\n" % result["errors"][-1]["error"])
        code = 1
    finally:
        if sb is not None:
            if args.keep:
                try:
                    sb.stop()
                except sandbox_module.SandboxError:
                    pass
                print("kept %s; remove it with: %s %s destroy --root %s" % (
                    sb.root, sys.executable, sandbox_module.__file__, sb.root))
            else:
                sb.destroy()
    finish(result, bench, started, args.out, args.markdown)
    return code


if __name__ == "__main__":
    sys.exit(main())
