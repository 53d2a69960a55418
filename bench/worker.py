#!/usr/bin/env python3
"""Runs one of our stages for the benchmark, as the service user, and prints its timing as one JSON line.

``python bench/worker.py OP ENV_PATH [ARG]`` (bench/run.py starts it with ``Sandbox.run_as_service_user``)::

    plan ENV                  {"tool", "client_num", "server_num", "compression_option", "args",
                               "compression", "extension"}: the flags our stage would give pg_basebackup
    base_backup ENV NAME      the night's postgres stage (take_base_backup, with the server facts that the
                              night's space stage asked for, untimed) into BACKUP_DIR/postgres/NAME:
                              {"seconds", "info", "call"}
    snapshot ENV NAME         the night's contentstore stage into BACKUP_DIR/contentstore/NAME
    remove ENV PATH           retention.remove_tree(PATH)

The stage bodies are called the way the nightly run calls them: through ``runner.Night``'s stage methods
when they exist (so an argument the runner adds, such as a parallelism setting, is measured too), with
``runner.unique_name`` pinned to NAME; otherwise the module functions directly. Only the call is timed,
not the interpreter start or the imports; ``steps`` lists the log messages of the call with their time
since its start (each external command is logged as it starts). Errors: exit 1, the traceback on stderr.
"""

import json
import logging
import os
import sys
import time

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT_DIR)


class StepLog(logging.Handler):
    """Keeps (seconds since the timed call began, message) of the log records emitted during it, so the
    JSON shows where a stage spends its time (each external command is logged as it starts)."""

    def __init__(self, limit=60):
        super().__init__(logging.INFO)
        self.started = time.monotonic()
        self.steps = []
        self.limit = limit

    def emit(self, record):
        if len(self.steps) < self.limit:
            self.steps.append((round(time.monotonic() - self.started, 3), record.getMessage()[:200]))


STEPS = StepLog()


def _night(cfg, log, name):
    import runner

    if not hasattr(runner, "Night"):
        return None, None
    runner.unique_name = lambda backup_dir, kind: name  # the bench chose a free name already
    night = runner.Night(cfg, log)
    return night, runner.Stage("bench", "benchmark")


def base_backup(cfg, log, name):
    import base_backup
    import catalog
    import postgres

    night, stage = _night(cfg, log, name)
    if night is not None and hasattr(night, "server"):
        # As the night does: its space stage asks the server for these facts and the postgres stage reuses them.
        conn = postgres.connect(cfg)
        try:
            night.server = postgres.server_facts(conn)
        finally:
            conn.close()
    started = STEPS.started = time.monotonic()
    if night is not None and hasattr(night, "_base_backup"):
        night._base_backup(stage)
        info, call = night.base_info, "runner.Night._base_backup"
    else:
        conn = postgres.connect(cfg)
        try:
            server = postgres.server_facts(conn)
        finally:
            conn.close()
        info = base_backup.take_base_backup(cfg, server, catalog.kind_dir(cfg.BACKUP_DIR, "postgres"), name, log)
        call = "base_backup.take_base_backup"
    return {"seconds": time.monotonic() - started, "info": info, "call": call, "steps": STEPS.steps}


def snapshot(cfg, log, name):
    import catalog
    import contentstore

    night, stage = _night(cfg, log, name)
    started = STEPS.started = time.monotonic()
    if night is not None and hasattr(night, "_snapshot"):
        night._snapshot(stage)
        call = "runner.Night._snapshot"
    else:
        contentstore.take_snapshot(cfg.contentstore_dir, cfg.BACKUP_DIR, name, log, timeout=cfg.RSYNC_TIMEOUT)
        call = "contentstore.take_snapshot"
    seconds = time.monotonic() - started
    info = catalog.read_info(os.path.join(catalog.kind_dir(cfg.BACKUP_DIR, "contentstore"), name)) \
        if hasattr(catalog, "read_info") else None
    return {"seconds": seconds, "info": info, "call": call, "steps": STEPS.steps}


def remove(cfg, log, path):
    import retention

    started = time.monotonic()
    retention.remove_tree(path)
    return {"seconds": time.monotonic() - started, "call": "retention.remove_tree"}


def plan(cfg, log):
    import postgres
    import subprocess_utils

    env = subprocess_utils.base_env({"PGPASSWORD": cfg.PGPASSWORD or None})
    tool, client_num = postgres.client_version(postgres.find_bin_dir(cfg.PG_BIN_DIR, cfg.ALF_BASE_DIR), env)
    conn = postgres.connect(cfg)
    try:
        server = postgres.server_facts(conn)
    finally:
        conn.close()
    chosen = postgres.basebackup_plan(client_num, server["version_num"], cfg.PG_COMPRESSION, "bench")
    return {"tool": tool, "client_num": client_num, "server_num": server["version_num"],
            "compression_option": cfg.PG_COMPRESSION, "args": chosen.args, "compression": chosen.compression,
            "level": chosen.level, "extension": chosen.extension, "notes": chosen.notes}


OPS = {"plan": (plan, 0), "base_backup": (base_backup, 1), "snapshot": (snapshot, 1), "remove": (remove, 1)}


def main(argv):
    if len(argv) < 2 or argv[0] not in OPS or len(argv) != 2 + OPS[argv[0]][1]:
        sys.stderr.write("usage: worker.py plan|base_backup|snapshot|remove ENV_PATH [NAME|PATH]\n")
        return 2
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import config

    logging.getLogger().addHandler(STEPS)
    cfg = config.load_config(argv[1])
    os.umask(0o077)  # as backup.py: everything written in BACKUP_DIR is private
    func = OPS[argv[0]][0]
    result = func(cfg, logging.getLogger("bench"), *argv[2:])
    sys.stdout.write(json.dumps(result, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
