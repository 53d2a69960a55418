"""RESTORE.md and RESTORE_QUICK_REFERENCE.md: every ```sh block runs against a sandbox (PostgreSQL 15).

Block kinds (the info string after ```):
    sh              run, in document order, one bash script per ### subsection (or ## section without
                    subsections), as the service user, with ``set -euo pipefail``;
    sh vars         variable settings for the reader's install: replaced by the sandbox's values (the test
                    fails when a block sets a name it cannot supply);
    sh pg-9.4, sh pg-9.5-9.6, sh pg-10-11, sh solr
                    cannot run here (no such server / no Solr): syntax-checked with ``bash -n``, their
                    recovery.conf compared with what restore_plan writes for those versions, and listed in a
                    warning with the reason, never silently skipped;
    text            example output, not commands.
"""

import collections
import glob
import json
import os
import re
import shlex
import subprocess
import time
import warnings

import pytest
import restore_plan
import restore_settings
import sandbox as sandbox_module
import wal_chain
from s3server import S3Server
from sandbox import free_port

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("RESTORE.md", "RESTORE_QUICK_REFERENCE.md")
NOT_HERE = {
    "pg-9.4": ("needs a PostgreSQL 9.4 server; it runs for real against the matrix's 9.4.26 (its own tools) in "
               "test_old_major_blocks_run_on_a_real_server_when_one_is_installed only when tests/matrix_pg.py has "
               "installed 9.4 (else that test is skipped)", [90426]),
    "pg-9.5-9.6": ("needs a PostgreSQL 9.5/9.6 server; this machine runs 15", [90524, 90623]),
    "pg-10-11": ("needs a PostgreSQL 10/11 server; it runs for real against PostgreSQL 10 in "
                 "test_old_major_blocks_run_on_a_real_server_when_one_is_installed only when tests/matrix_pg.py "
                 "has installed 10 (else that test is skipped)", [100023, 110022]),
    "solr": ("needs an Alfresco Solr installation; the sandbox has none", []),
}
Block = collections.namedtuple("Block", "doc line lang marker text section subsection")
FENCE = re.compile(r"^```(\S*)(?:[ \t]+(\S+))?[ \t]*$")
DOC_NODE = 7  # the document purged after TARGET_TIME in the sandbox's history


def read(name):
    with open(os.path.join(PROJECT, name), encoding="utf-8") as handle:
        return handle.read()


def parse_blocks(name):
    blocks, section, subsection, current = [], "", "", None
    for number, line in enumerate(read(name).splitlines(), 1):
        if current is not None:
            if line.strip() == "```":
                blocks.append(current._replace(text="\n".join(current.text)))
                current = None
            else:
                current.text.append(line)
            continue
        if line.startswith("## "):
            section, subsection = line[3:].strip(), ""
        elif line.startswith("### "):
            subsection = line[4:].strip()
        match = FENCE.match(line)
        if match:
            current = Block(name, number, match.group(1), match.group(2), [], section, subsection)
    assert current is None, "%s: unclosed code block at line %d" % (name, current.line)
    return blocks


def kind(block):
    if block.lang == "text" and block.marker is None:
        return "output"
    if block.lang == "sh" and block.marker is None:
        return "run"
    if block.lang == "sh" and block.marker == "vars":
        return "vars"
    if block.lang == "sh" and block.marker in NOT_HERE:
        return "not-here"
    return "unknown"


def var_names(block):
    names = []
    for line in block.text.splitlines():
        names += re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", line.split("#", 1)[0])
    return names


SUPPLIED = {"ALF_BASE_DIR", "BACKUP_DIR", "WAL_ARCHIVE_DIR", "TOOL_DIR", "ENV_FILE", "PY", "PGBIN", "PGHOST",
            "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "RESTORE_DIR", "RESTORE_PORT", "TARGET_TIME",
            "RESTORE_POINT", "DOC_NAME", "BASE", "SNAPSHOT", "CONFIG"}


# ---------------------------------------------------------------- static checks (fast)

@pytest.mark.parametrize("doc", DOCS)
def test_every_block_is_a_known_kind_and_every_variable_is_supplied(doc):
    blocks = parse_blocks(doc)
    assert [b for b in blocks if kind(b) == "run"], doc
    for block in blocks:
        assert kind(block) != "unknown", "%s:%d: unknown block ```%s %s" % (doc, block.line, block.lang,
                                                                             block.marker or "")
        if kind(block) == "vars":
            unknown = set(var_names(block)) - SUPPLIED
            assert not unknown, "%s:%d sets %s, which the test cannot supply" % (doc, block.line, unknown)
    text = read(doc)
    # Whole commands live in blocks (which run), not in inline code (which cannot).
    for span in re.findall(r"`([^`\n]+)`", text):
        assert not re.search(r"restore\.py\"? --env|pg_ctl\"? -D|^tar -x|^rsync -a \"", span), (doc, span)


@pytest.mark.parametrize("doc", DOCS)
def test_every_shell_block_has_valid_syntax(doc):
    for block in parse_blocks(doc):
        if block.lang == "sh":
            proc = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
            assert proc.returncode == 0, "%s:%d: %s" % (doc, block.line, proc.stderr)


def heredoc(text, target):
    match = re.search(r'cat >>? "\$RESTORE_DIR/%s" <<EOF\n(.*?)\nEOF' % re.escape(target), text, re.S)
    return match.group(1) if match else None


def expand(template, values):
    script = "".join("%s=%s\n" % (k, shlex.quote(v)) for k, v in values.items()) + "cat <<EOF\n%s\nEOF\n" % template
    return subprocess.run(["bash", "-u", "-c", script], capture_output=True, text=True, check=True).stdout


def settings(text):
    result = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        value = value.strip()
        if value.startswith("'") and value.endswith("'"):
            value = value[1:-1].replace("''", "'")
        result[name.strip()] = value
    return result


def test_recovery_conf_blocks_for_old_versions_match_what_the_tool_writes():
    values = {"TOOL_DIR": "/opt/alfresco-backup", "WAL_ARCHIVE_DIR": "/backup/alfresco/pg_wal",
              "TARGET_TIME": "2024-05-01 14:30:00+02:00", "RESTORE_PORT": "5433"}
    target = restore_plan.Target("time", restore_plan.parse_time(values["TARGET_TIME"]))
    command = restore_settings.restore_command("/usr/bin/python3", values["TOOL_DIR"] + "/wal.py",
                                           values["WAL_ARCHIVE_DIR"])
    checked = 0
    for block in parse_blocks("RESTORE.md"):
        if kind(block) != "not-here" or not NOT_HERE[block.marker][1]:
            continue
        conf = heredoc(block.text, "recovery.conf")
        assert conf, "%s:%d has no recovery.conf" % (block.doc, block.line)
        written = settings(expand(conf, values))
        for version in NOT_HERE[block.marker][1]:
            expected = dict(restore_settings.recovery_lines(version, command, target))
            assert set(written) == set(expected), (block.line, version, written, expected)
            for name, value in expected.items():
                if name == "recovery_target_time":
                    assert restore_plan.parse_time(written[name]) == target.value, block.line
                else:
                    assert written[name] == value, (block.line, version, name)
            checked += 1
        auto = settings(expand(heredoc(block.text, "postgresql.auto.conf"), values))
        assert auto["archive_mode"] == "off", block.line
        assert "recovery.signal" not in block.text, block.line
        wal_dir = "pg_wal" if block.marker == "pg-10-11" else "pg_xlog"
        assert re.search(r'tar -xf "\$(BASE"/pg_wal\.tar\*|f") -C "\$RESTORE_DIR/%s"' % wal_dir, block.text), block.line
        assert ("/pg_wal\"" in block.text) == (block.marker == "pg-10-11"), block.line
    assert checked == 5


def test_blocks_that_cannot_run_here_are_listed_with_their_reason():
    listed = []
    for doc in DOCS:
        for block in parse_blocks(doc):
            if kind(block) == "not-here":
                listed.append("%s:%d ```sh %s (%s / %s): %s" % (doc, block.line, block.marker, block.section,
                                                                 block.subsection, NOT_HERE[block.marker][0]))
    warnings.warn("NOT EXECUTED on this machine (%d doc blocks):\n  %s" % (len(listed), "\n  ".join(listed)),
                  stacklevel=1)
    markers = sorted(re.search(r"```sh (\S+)", entry).group(1) for entry in listed)
    assert markers == ["pg-10-11", "pg-9.4", "pg-9.5-9.6", "solr"], listed


def slug(title):
    text = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS)
def test_internal_links_resolve(doc):
    text = read(doc)
    anchors, seen = set(), collections.Counter()
    for heading in re.findall(r"^#{1,4} (.+)$", text, re.M):
        base = slug(heading)
        anchors.add(base if not seen[base] else "%s-%d" % (base, seen[base]))
        seen[base] += 1
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in anchors, "%s: broken link #%s" % (doc, target)
    for target in re.findall(r"\]\(([A-Z_]+\.md)\)", text):
        assert os.path.isfile(os.path.join(PROJECT, target)), target


def test_restore_md_covers_every_scenario_for_both_version_families():
    text = read("RESTORE.md")
    headings = re.findall(r"^##+ (.+)$", text, re.M)
    for needed in ("Database only", "Point in time", "Contentstore only", "A single document",
                   "Full restore in place", "Onto a new host", "After a restore: Solr and the index",
                   "Test your backups: the restore drill", "I lost the server"):
        assert needed in headings, needed
    assert headings.count("By hand, PostgreSQL 12 and later") == 3
    assert headings.count("By hand, PostgreSQL 9.4 to 11") == 2
    for needed in ("recovery.signal", "recovery.conf", "pause_at_recovery_target", "recovery_target_action",
                   "pg_xlog", "recovery_target_timeline", "archive_mode = off", "--keep-archiving"):
        assert needed in text, needed


def test_quick_reference_is_one_page():
    text = read("RESTORE_QUICK_REFERENCE.md")
    assert len(text.splitlines()) <= 90 and "RESTORE.md" in text


# ---------------------------------------------------------------- running the documents

ALF_SCHEMA = """
CREATE TABLE alf_namespace (id bigint PRIMARY KEY, version bigint NOT NULL, uri varchar(100) NOT NULL);
CREATE TABLE alf_qname (id bigint PRIMARY KEY, version bigint NOT NULL, ns_id bigint NOT NULL
    REFERENCES alf_namespace(id), local_name varchar(200) NOT NULL);
CREATE TABLE alf_node_properties (node_id bigint NOT NULL, actual_type_n integer NOT NULL,
    persisted_type_n integer NOT NULL, boolean_value boolean, long_value bigint, float_value real,
    double_value double precision, string_value varchar(1024), serializable_value bytea,
    qname_id bigint NOT NULL REFERENCES alf_qname(id), list_index integer NOT NULL, locale_id bigint NOT NULL,
    PRIMARY KEY (node_id, qname_id, list_index, locale_id));
INSERT INTO alf_namespace VALUES (1, 1, 'http://www.alfresco.org/model/content/1.0'),
    (2, 1, 'http://www.alfresco.org/model/system/1.0');
INSERT INTO alf_qname VALUES (1, 1, 1, 'name'), (2, 1, 1, 'content'), (3, 1, 2, 'name');
INSERT INTO alf_node_properties (node_id, actual_type_n, persisted_type_n, string_value, qname_id, list_index,
    locale_id) SELECT id, 6, 6, 'document-' || id || '.pdf', 1, 0, 1 FROM alf_node;
INSERT INTO alf_node_properties (node_id, actual_type_n, persisted_type_n, string_value, qname_id, list_index,
    locale_id) SELECT id, 6, 6, 'document-' || id || '.pdf', 3, 0, 1 FROM alf_node WHERE id = 9;
INSERT INTO alf_node_properties (node_id, actual_type_n, persisted_type_n, long_value, qname_id, list_index,
    locale_id) SELECT n.id, 21, 3, d.id, 2, 0, 1 FROM alf_node n JOIN alf_content_data d ON d.id = n.id;
"""


def backup(sb, env):
    result = sb.run_cli("backup.py", env_path=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    time.sleep(1)


def history(sb, env):
    """Two nights of backups around TARGET_TIME; returns the facts the documents' checks expect."""
    sb.psql(ALF_SCHEMA)
    backup(sb, env)
    sb.psql("INSERT INTO alf_node VALUES (9001, 'kept', 1, 'x')")
    time.sleep(1)
    facts = {"target": sb.psql("SELECT clock_timestamp()")}
    sb.psql("SELECT pg_create_restore_point('before-delete')")
    facts["count_at_target"] = sb.psql("SELECT count(*) FROM alf_node")
    facts["doc_url"], facts["doc_size"] = sb.psql("SELECT content_url || '|' || content_size FROM alf_content_url "
                                                  "WHERE id = %d" % DOC_NODE).split("|")
    time.sleep(1)
    sb.psql("BEGIN; UPDATE alf_content_url SET orphan_time = 1 WHERE id = %d; DELETE FROM alf_node_properties "
            "WHERE node_id = %d; DELETE FROM alf_content_data WHERE id = %d; DELETE FROM alf_node WHERE id = %d; "
            "COMMIT;" % ((DOC_NODE,) * 4))
    backup(sb, env)
    sb.psql("INSERT INTO alf_node VALUES (9002, 'later', 1, 'x'), (9003, 'later', 1, 'x')")
    segment = sb.psql("SELECT pg_walfile_name(pg_switch_wal())", db="postgres", user="postgres")
    assert wal_chain.wait_for_file(sb.wal_archive_dir, segment, 60)
    facts["count_latest"] = sb.psql("SELECT count(*) FROM alf_node")
    assert facts["count_latest"] != facts["count_at_target"]
    shipped = sb.run_cli("backup.py", ["--offsite"], env_path=env)  # for "I lost the server"
    assert shipped.returncode == 0, shipped.stdout[-3000:]
    return facts


def newest(sb, kind, before=None):
    paths = []
    for meta in sorted(glob.glob(os.path.join(sb.backup_dir, kind, "*.json"))):
        with open(meta) as handle:
            info = json.load(handle)
        if info["status"] == "DONE" and (before is None or restore_plan.parse_time(
                info["ended_at"].replace("T", " ")) < restore_plan.parse_time(before)):
            paths.append(meta[:-5])
    return paths[-1]


def make_new_host(sb, root):
    """A fresh install of the same bundle at ``root`` (empty data, its own alfresco.sh), like a new machine."""
    base = os.path.join(root, "alfresco")
    for rel in ("postgresql/bin", "alf_data/postgresql", "alf_data/contentstore", "alf_data/keystore",
                "tomcat/logs", "tomcat/temp", "tomcat/shared/classes/alfresco/extension"):
        os.makedirs(os.path.join(base, rel), mode=0o700, exist_ok=True)
    for name in os.listdir(sb.real_pg_bin):
        os.symlink(os.path.join(sb.real_pg_bin, name), os.path.join(base, "postgresql/bin", name))
    for rel, text in (("alf_data/postgresql/PG_VERSION", "15\n"), ("tomcat/logs/catalina.out", ""),
                      ("tomcat/shared/classes/alfresco-global.properties", "dir.root=/nowhere\n"),
                      ("alfresco.sh", sandbox_module.ALFRESCO_SH.replace("@INSTALLDIR@", shlex.quote(base)))):
        with open(os.path.join(base, rel), "w") as handle:
            handle.write(text)
    os.chmod(os.path.join(base, "alfresco.sh"), 0o755)
    sb.chown_to_service_user(root)
    return base


@pytest.fixture(scope="module")
def docs_sandbox(service_user):
    """One sandbox with its history for both documents (the quick reference runs first)."""
    sb = sandbox_module.Sandbox.create()
    try:
        # Started inside the try: a server that cannot start must not leave the sandbox's PostgreSQL running.
        with S3Server(owner=service_user) as s3:
            env = sb.write_env(**s3.env())
            sb.offsite_env = s3.env()
            yield sb, env, history(sb, env)
    finally:
        sb.destroy()


def run_document(prepared, doc, expectations):
    sb, env, facts = prepared
    values = {"ALF_BASE_DIR": sb.alf_base_dir, "BACKUP_DIR": sb.backup_dir, "WAL_ARCHIVE_DIR": sb.wal_archive_dir,
              "TOOL_DIR": sb.project_dir, "ENV_FILE": env, "PY": sb.python, "PGBIN": sb.pg_bin,
              "PGHOST": sb.socket_dir, "PGPORT": str(sb.port), "PGUSER": "alfresco", "PGDATABASE": "alfresco",
              "PGPASSWORD": sb.alfresco_password, "TARGET_TIME": facts["target"], "RESTORE_POINT": "before-delete",
              "DOC_NAME": "document-%d.pdf" % DOC_NODE}
    units = collections.OrderedDict()
    blocks = parse_blocks(doc)
    global_vars = next(b for b in blocks if kind(b) == "vars")
    for block in blocks:
        if kind(block) in ("run", "vars") and block is not global_vars:
            units.setdefault((block.section, block.subsection), []).append(block)
    ran, new_host, lost = 0, None, False
    for number, ((section, subsection), unit) in enumerate(units.items()):
        if not any(kind(b) == "run" for b in unit):
            continue
        unit_values = dict(values, RESTORE_DIR=os.path.join(sb.root, "%s%d" % (doc[8].lower(), number)),
                           RESTORE_PORT=str(free_port()))
        target_unit = section == "Point in time" or section == "Contentstore only"
        unit_values["BASE"] = newest(sb, "postgres", facts["target"] if target_unit else None)
        unit_values["SNAPSHOT"] = newest(sb, "contentstore")
        unit_values["CONFIG"] = newest(sb, "config")
        if section == "I lost the server":  # BACKUP_DIR is gone: only the off-site copy and a new .env remain
            sb.run_as_service_user([os.path.join(sb.alf_base_dir, "alfresco.sh"), "stop"], timeout=120)
            os.rename(sb.backup_dir, sb.backup_dir + ".lost")
            lost = True
            new_host = make_new_host(sb, os.path.join(sb.root, "lostserver"))
            unit_values.update(ALF_BASE_DIR=new_host, PGBIN=os.path.join(new_host, "postgresql", "bin"),
                               ENV_FILE=sb.write_env(path=os.path.join(sb.root, "lostserver.env"),
                                                     ALF_BASE_DIR=new_host, BACKUP_DIR=os.path.join(
                                                         sb.root, "newbackups"), **sb.offsite_env))
        if section == "Onto a new host":
            sb.run_as_service_user([os.path.join(sb.alf_base_dir, "alfresco.sh"), "stop"], timeout=120)
            new_host = make_new_host(sb, os.path.join(sb.root, "newhost"))
            unit_values.update(ALF_BASE_DIR=new_host, PGBIN=os.path.join(new_host, "postgresql", "bin"),
                               ENV_FILE=sb.write_env(path=os.path.join(sb.root, "newhost.env"),
                                                     ALF_BASE_DIR=new_host))
        script = ["set -euo pipefail"]
        script += ["export %s=%s" % (k, shlex.quote(unit_values[k])) for k in var_names(global_vars)]
        for block in unit:
            if kind(block) == "vars":
                script += ["export %s=%s" % (k, shlex.quote(unit_values[k])) for k in var_names(block)]
            else:
                script += ["echo '@@ %s line %d @@'" % (doc, block.line), block.text]
                ran += 1
        try:
            proc = sb.run_as_service_user(["bash", "-c", "\n".join(script)], timeout=600,
                                          stderr=subprocess.STDOUT, capture_output=False, stdout=subprocess.PIPE)
            output = proc.stdout
            where = (re.findall(r"@@ (.*?) @@", output) or ["before the first block"])[-1]
            assert proc.returncode == 0, "%s / %s failed in the block at %s:\n%s" % (section, subsection, where,
                                                                                     output[-4000:])
            for key, (present, absent) in expectations(facts, unit_values, sb).items():
                if key == (section, subsection) or key == section:
                    for text in present:
                        assert text in output, "%s / %s: %r not in output:\n%s" % (section, subsection, text,
                                                                                    output[-4000:])
                    for text in absent:
                        assert text not in output, "%s / %s: %r in output" % (section, subsection, text)
        finally:
            for data in glob.glob(unit_values["RESTORE_DIR"] + "*"):
                if os.path.exists(os.path.join(data, "postmaster.pid")):
                    sb.run_as_service_user([os.path.join(sb.pg_bin, "pg_ctl"), "-D", data, "-m", "immediate",
                                            "-w", "stop"], timeout=120)
            if new_host:
                sb.run_as_service_user([os.path.join(new_host, "alfresco.sh"), "stop"], timeout=120)
            if lost:
                os.rename(sb.backup_dir + ".lost", sb.backup_dir)
                lost = False
    return ran, facts


def restore_md_expectations(facts, values, sb):
    latest, at_target = "\n%s\n" % facts["count_latest"], "\n%s\n" % facts["count_at_target"]
    return {
        "What can I restore?": (["Recovery window: any moment from"], []),
        "Test your backups: the restore drill": (["Restore drill OK"], ["Restore drill FAILED"]),
        ("Database only", "With the tool"): ([latest, "Recovery finished in"], []),
        ("Database only", "By hand, PostgreSQL 12 and later"): ([latest], []),
        ("Point in time", "With the tool"): ([at_target, "Recovery finished in"], []),
        ("Point in time", "By hand, PostgreSQL 12 and later"): ([at_target, "recovery stopping before commit"], []),
        "Contentstore only": (["Restored contentstore snapshot " + os.path.basename(values["SNAPSHOT"])], []),
        "A single document": ([facts["doc_url"], "Copied 1 file(s)"], []),
        ("Full restore in place", "With the tool"): (["Alfresco started", "roll-back commands"], []),
        ("Full restore in place", "By hand, PostgreSQL 12 and later"): (["OK: PostgreSQL is down"],
                                                                        ["STOP:", "MISSING"]),
        "Onto a new host": (["Backup summary (OK)", "dir.root=%s/alf_data" % values["ALF_BASE_DIR"]], []),
        "I lost the server": (["Recovery window: any moment from", "Restore drill OK", "Alfresco started",
                               "dir.root=%s/alf_data" % values["ALF_BASE_DIR"]], ["Restore drill FAILED"]),
    }


def quick_expectations(facts, values, sb):
    return {
        "Is it restorable?": (["Restore drill OK"], []),
        "The database as it was at a moment (a copy)": (["\n%s\n" % facts["count_at_target"]], []),
        "Everything back in place": (["Alfresco started"], []),
        "By hand, PostgreSQL 12 and later (a copy, latest state)": (["\n%s\n" % facts["count_latest"]], []),
    }


def test_quick_reference_runs_against_a_sandbox(docs_sandbox):
    ran, _facts = run_document(docs_sandbox, "RESTORE_QUICK_REFERENCE.md", quick_expectations)
    assert ran == len([b for b in parse_blocks("RESTORE_QUICK_REFERENCE.md") if kind(b) == "run"])


def test_restore_md_runs_against_a_sandbox(docs_sandbox):
    sb = docs_sandbox[0]
    restored_before = len(glob.glob(sb.pgdata + ".restored-*"))
    ran, facts = run_document(docs_sandbox, "RESTORE.md", restore_md_expectations)
    runnable = [b for b in parse_blocks("RESTORE.md") if kind(b) == "run"]
    assert ran == len(runnable)
    # The single document came back with its recorded size; production was rolled back twice (tool, by hand).
    doc = glob.glob(os.path.join(sb.root, "m*-doc", "document-%d.pdf" % DOC_NODE))
    assert len(doc) == 1
    assert os.path.getsize(doc[0]) == int(facts["doc_size"])
    assert len(glob.glob(sb.pgdata + ".restored-*")) == restored_before + 2
    assert not glob.glob(sb.pgdata + ".before-restore-*")


@pytest.mark.matrix
@pytest.mark.parametrize("marker,major,done_file", [("pg-10-11", 10, "recovery.done"),
                                                    ("pg-9.4", "9.4", "recovery.done")])
def test_old_major_blocks_run_on_a_real_server_when_one_is_installed(sandbox_factory, marker, major, done_file):
    """The ```sh pg-10-11 and pg-9.4 blocks for real, when the version matrix (tests/matrix_pg.py) has installed
    PostgreSQL 10 / 9.4 (the Alfresco 5.2 bundle's major, with its own tools) on this machine; otherwise skipped
    with the reason (they then stay in the NOT EXECUTED list)."""
    try:
        import matrix_pg

        install = matrix_pg.locate(major)
    except ImportError as exc:
        pytest.skip("tests/matrix_pg.py is not available: %s" % exc)
    except Exception as exc:  # matrix_pg.Unavailable: not installed here
        pytest.skip("PostgreSQL %s is not installed here: %s" % (major, exc))
    sb = sandbox_factory(pg_bin=install.bin_dir, n_files=5)
    env = sb.write_env()
    backup(sb, env)
    sb.psql("INSERT INTO alf_node VALUES (9001, 'kept', 1, 'x')")
    time.sleep(1)
    moment = sb.psql("SELECT clock_timestamp()")
    time.sleep(1)
    sb.psql("INSERT INTO alf_node VALUES (9002, 'later', 1, 'x')")
    segment = sb.switch_wal()
    assert wal_chain.wait_for_file(sb.wal_archive_dir, segment, 60)
    block = next(b for b in parse_blocks("RESTORE.md") if b.marker == marker)
    dest, port = os.path.join(sb.root, "old-major"), free_port()
    values = {"BASE": newest(sb, "postgres"), "RESTORE_DIR": dest, "RESTORE_PORT": str(port), "TARGET_TIME": moment,
              "TOOL_DIR": sb.project_dir, "WAL_ARCHIVE_DIR": sb.wal_archive_dir, "PGBIN": sb.pg_bin}
    script = "set -euo pipefail\n" + "".join("export %s=%s\n" % (k, shlex.quote(v)) for k, v in values.items())
    try:
        proc = sb.run_as_service_user(["bash", "-c", script + block.text], timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(dest, done_file)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert os.path.exists(os.path.join(dest, done_file)), sorted(os.listdir(dest))  # promoted
        rows = sb.run_as_service_user([os.path.join(sb.pg_bin, "psql"), "-X", "-At", "-h", "/tmp", "-p", str(port),
                                       "-U", "alfresco", "-d", "alfresco", "-c",
                                       "SELECT string_agg(id::text, ',') FROM alf_node WHERE id > 9000"],
                                      extra_env={"PGPASSWORD": sb.alfresco_password})
        assert rows.stdout.strip() == "9001", rows.stdout + rows.stderr
    finally:
        sb.run_as_service_user([os.path.join(sb.pg_bin, "pg_ctl"), "-D", dest, "-m", "immediate", "-w", "stop"])
