"""Unit tests of the set-up wizard's pure parts: .env and answers files (checked against python-dotenv
itself), postgresql.conf editing, per-version settings, pg_hba lines, crontab merging, properties, and the
Tomcat stop fallback (with real processes)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import setup_answers
import setup_files
import setup_formats
import setup_service
import setup_sys
from dotenv import dotenv_values
from setup_sys import AnswerError, SetupError

TRICKY = {
    "PLAIN": "value",
    "SPACES": "a b  c",
    "HASH": "pass#word # not a comment",
    "SINGLE": "it's",
    "DOUBLE": 'say "hi"',
    "BACKSLASH": "C:\\path\\n\\",
    "DOLLAR": "pa$HOME ss$x$",
    "EMPTY": "",
    "EQUALS": "a=b=c",
    "UNICODE": "grüße",
    "ESCAPED_QUOTE": "a\\'b",
    "INNER_BACKSLASH": "x\\y z",
}


def dotenv_read(tmp_path, text):
    path = tmp_path / "x.env"
    path.write_text(text, encoding="utf-8")
    return {k: v if v is not None else "" for k, v in dotenv_values(str(path)).items()}


def test_quote_env_round_trips_through_python_dotenv(tmp_path):
    text = "".join("%s=%s\n" % (k, setup_files.quote_env(v)) for k, v in TRICKY.items())
    assert dotenv_read(tmp_path, text) == TRICKY
    assert setup_files.parse_env(text) == TRICKY


def test_quote_env_refuses_what_python_dotenv_cannot_hold():
    for bad in ("two\nlines", "ends with\\", "#x\\", "pa${HOME}ss", "'x\\"):
        with pytest.raises(ValueError):
            setup_files.quote_env(bad)


@pytest.mark.parametrize("text", [
    'A=plain\nB="double \\"q\\" \\\\ \\n end"\nC=\'single \\\' \\\\ x\'\n',
    "export A=1\n  B = spaced value   # comment\n# full comment\n\nC=#notcomment\n",
    'A=one\nB="${A}-two"\nC=${A:-dflt}${MISSING:-dflt}\nD=\'${A}\'\nE=\nF=${E:-dflt}\n',
    'A="multi\nline"\nB=after\n',
    "A=\nB\nC=x\n",
    "A='a\\\\b'\nB='x\\y'\n",
])
def test_parse_env_reads_like_python_dotenv(tmp_path, text):
    assert setup_files.parse_env(text) == dotenv_read(tmp_path, text)


def test_parse_env_reports_a_broken_line():
    with pytest.raises(setup_files.TextError, match="line 2"):
        setup_files.parse_env("A=1\nB='unterminated\n")


def test_format_env_writes_every_option_and_reads_back(tmp_path):
    import config

    values = {"PGUSER": "alfresco", "PGPASSWORD": "s3'c\"r$x t", "ALF_BASE_DIR": "/opt/alfresco",
              "BACKUP_DIR": "/b", "LEGACY": "kept"}
    text = setup_files.format_env(values, config.OPTIONS)
    read = dotenv_read(tmp_path, text)
    assert set(config.OPTION_NAMES) <= set(read) and read["LEGACY"] == "kept"
    assert read["PGPASSWORD"] == values["PGPASSWORD"] and read["PGPORT"] == "5432"
    effective = setup_files.effective_env(values, config.OPTIONS)
    assert setup_files.effective_env(read, config.OPTIONS) == effective
    assert effective != setup_files.effective_env(dict(values, RETENTION_DAYS="8"), config.OPTIONS)


def test_unified_diff_shows_new_and_changed_files():
    assert setup_files.unified_diff("a\n", "a\n", "f") == ""
    assert "+b" in setup_files.unified_diff("a\n", "a\nb\n", "f")
    assert setup_files.unified_diff(None, "x\n", "f").startswith("--- /dev/null")


# ---- postgresql.conf ----------------------------------------------------------------------------------
CONF = """# comment wal_level = minimal
#archive_mode = off\t\t# (change requires restart)
wal_level = minimal
port = 5432
wal_level = 'minimal'   # the last one wins
archive_command = 'it''s \\'quoted\\''  # trailing
include_dir 'conf.d'
"""


def test_parse_conf_takes_the_last_active_line_and_unquotes():
    values = setup_files.parse_conf(CONF)
    assert values["wal_level"] == "minimal" and "archive_mode" not in values
    assert values["archive_command"] == "it's 'quoted'"
    assert values["<include>"] == ["conf.d"]


def test_set_conf_replaces_the_last_line_appends_the_rest_and_is_idempotent():
    command = '"/usr/bin/python3" "/p/wal.py" archive-push --gzip "%p" "/b/pg_wal"'
    changes = {"wal_level": "replica", "archive_mode": "on", "archive_command": command, "max_wal_senders": "3"}
    new = setup_files.set_conf(CONF, changes)
    values = setup_files.parse_conf(new)
    assert values["wal_level"] == "replica" and values["archive_mode"] == "on"
    assert values["archive_command"] == command and values["max_wal_senders"] == "3"
    assert "wal_level = minimal\n" in new  # the overridden earlier line is left alone
    assert "#archive_mode = off" in new and new.count(setup_files.MARKER) == 3
    assert setup_files.set_conf(new, changes) == new


def test_conf_quote():
    assert setup_files.conf_quote("3") == "3"
    assert setup_files.conf_quote("on") == "'on'"
    assert setup_files.conf_quote("it's") == "'it''s'"


def test_archive_command_quotes_paths_and_refuses_unsafe_ones():
    assert setup_files.archive_command("/usr/bin/python3", "/opt/a b/wal.py", "/mnt/wal") == \
        '"/usr/bin/python3" "/opt/a b/wal.py" archive-push --gzip "%p" "/mnt/wal"'
    for bad in ('/x"y', "/x$y", "/x`y", "/x\\y", "/x%y", "relative", "/x\ny"):
        with pytest.raises(setup_files.TextError):
            setup_files.archive_command("/usr/bin/python3", "/p/wal.py", bad)


def test_pg_number_understands_units():
    assert setup_files.pg_number("300") == 300
    assert setup_files.pg_number("5min") == 300
    assert setup_files.pg_number("1h") == 3600
    assert setup_files.pg_number("1GB", "kB") == 1024 * 1024
    assert setup_files.pg_number("junk") is None


def settings_of(num):
    return {s.name: s for s in setup_files.desired_settings(num, "CMD")}


@pytest.mark.parametrize("num,level,keep", [
    (90426, "hot_standby", "wal_keep_segments"), (90524, "hot_standby", "wal_keep_segments"),
    (90624, "replica", "wal_keep_segments"), (100023, "replica", None), (120020, "replica", None),
    (130016, "replica", None), (150018, "replica", None), (170000, "replica", None)])
def test_desired_settings_fit_the_version(num, level, keep):
    settings = settings_of(num)
    assert settings["wal_level"].value == level and settings["wal_level"].restart
    assert settings["archive_mode"].value == "on" and settings["archive_command"].value == "CMD"
    assert settings["max_wal_senders"].value == "3" and settings["archive_timeout"].value == "300"
    keeps = [n for n in settings if n.startswith("wal_keep")]
    assert keeps == ([keep] if keep else [])
    assert "wal_keep_size" not in settings or num >= 130000


def test_wal_keep_name_by_version():
    assert setup_files.wal_keep_name(90400) == "wal_keep_segments"
    assert setup_files.wal_keep_name(120020) == "wal_keep_segments"
    assert setup_files.wal_keep_name(130000) == "wal_keep_size"


def test_acceptable_values_are_kept_never_lowered_or_downgraded():
    new, old = settings_of(150018), settings_of(90426)
    assert new["wal_level"].ok("logical") and new["wal_level"].ok("replica") and new["wal_level"].ok("hot_standby")
    assert not new["wal_level"].ok("minimal")
    assert old["wal_level"].ok("hot_standby") and not old["wal_level"].ok("archive")
    assert new["archive_mode"].ok("always") and not new["archive_mode"].ok("off")
    assert new["max_wal_senders"].ok("10") and new["max_wal_senders"].ok("3")
    assert not new["max_wal_senders"].ok("2") and not old["max_wal_senders"].ok("0")
    assert new["archive_timeout"].ok("5min") and not new["archive_timeout"].ok("0")
    assert not new["archive_command"].ok("(disabled)") and not new["archive_command"].ok("cp %p /x/%f")
    assert old["wal_keep_segments"].ok("128") and not old["wal_keep_segments"].ok("0")


# ---- pg_hba.conf ----------------------------------------------------------------------------------------
SCRAM_HBA = "# TYPE DATABASE USER ADDRESS METHOD\nlocal all all scram-sha-256\nhost all all 127.0.0.1/32 " \
            "scram-sha-256\n"


def test_hba_plan_adds_three_lines_with_the_files_method_once():
    new, added, method = setup_formats.hba_plan(SCRAM_HBA, "alfresco", 150018)
    assert method == "scram-sha-256" and len(added) == 3
    records = [f for _n, f in setup_formats.parse_hba(new)]
    assert ["local", "replication", "alfresco", "scram-sha-256"] in records
    assert ["host", "replication", "alfresco", "127.0.0.1/32", "scram-sha-256"] in records
    assert ["host", "replication", "alfresco", "::1/128", "scram-sha-256"] in records
    assert new.startswith(SCRAM_HBA) and setup_formats.MARKER in new
    assert setup_formats.hba_plan(new, "alfresco", 150018) == (new, [], "scram-sha-256")


def test_hba_method_follows_the_file_and_is_never_trust():
    md5 = "local all all md5\nhost all all 0.0.0.0/0 md5\n"
    assert setup_formats.hba_plan(md5, "alfresco", 90426)[2] == "md5"
    trust = "local all all trust\nhost all all 127.0.0.1/32 trust\n"
    for num, expected in ((150018, "scram-sha-256"), (90426, "md5")):
        new, added, method = setup_formats.hba_plan(trust, "alfresco", num)
        assert method == expected and all("trust" not in line for line in added)
    assert setup_formats.hba_method("local all all peer\n", 150018) == "scram-sha-256"


def test_hba_plan_respects_existing_lines_and_inserts_before_the_first_replication_line():
    text = SCRAM_HBA + "local replication all scram-sha-256\nhost replication backup 127.0.0.1/32 md5\n" \
                       "host replication all ::1/128 reject\n"
    new, added, _method = setup_formats.hba_plan(text, "alfresco", 150018)
    assert added == ["host\treplication\talfresco\t127.0.0.1/32\t\tscram-sha-256",
                     "host\treplication\talfresco\t::1/128\t\t\tscram-sha-256"]
    lines = new.splitlines()
    assert lines.index(added[1]) < lines.index("host replication all ::1/128 reject")
    assert lines.index(added[0]) < lines.index("local replication all scram-sha-256")


def test_hba_role_quotes_unusual_names():
    assert setup_formats.hba_role("alfresco") == "alfresco"
    assert setup_formats.hba_role("Alf Resco") == '"Alf Resco"'
    new, added, _ = setup_formats.hba_plan(SCRAM_HBA, "Alf", 150018)
    assert '"Alf"' in added[0] and setup_formats.hba_plan(new, "Alf", 150018)[1] == []


# ---- crontab ----------------------------------------------------------------------------------------------
def entry(schedule="0 2 * * *", env="/srv/b/.env"):
    return setup_formats.cron_entry(schedule, "/opt/alfresco-backup", "/opt/alfresco-backup/.venv/bin/python",
                                    env, "/srv/b/logs")


def test_cron_entry_escapes_percent_and_quotes_paths():
    marker, line = entry()
    assert marker == "# %s --env /srv/b/.env" % setup_formats.MARKER
    assert line.startswith("0 2 * * * cd '/opt/alfresco-backup' && '/opt/alfresco-backup/.venv/bin/python' "
                           "backup.py --env '/srv/b/.env' >> '/srv/b/logs'/cron-$(date +")
    assert "%" not in line.replace("\\%", "")


def test_merge_crontab_adds_once_replaces_and_keeps_other_lines():
    marker, line = entry()
    other = "MAILTO=admin@example.org\n30 1 * * * /usr/local/bin/other-job\n"
    merged, note = setup_formats.merge_crontab(other, marker, line)
    assert note is None and merged.startswith(other) and merged.count(line) == 1
    assert setup_formats.merge_crontab(merged, marker, line) == (merged, None)
    marker2, line2 = entry("15 3 * * *")
    replaced, _ = setup_formats.merge_crontab(merged, marker2, line2)
    assert line not in replaced and replaced.count(line2) == 1 and replaced.startswith(other)
    empty, _ = setup_formats.merge_crontab("", marker, line)
    assert empty == "%s\n%s\n" % (marker, line)
    other_env, _ = setup_formats.merge_crontab(merged, *entry(env="/srv/c/.env"))
    assert other_env.count("backup.py") == 2


def test_merge_crontab_leaves_a_hand_made_entry_alone():
    marker, line = entry()
    hand = "0 1 * * * cd /opt/alfresco-backup && .venv/bin/python backup.py --env /srv/b/.env\n"
    merged, note = setup_formats.merge_crontab(hand, marker, line)
    assert merged == hand and "already exists" in note


def test_valid_schedule():
    for good in ("0 2 * * *", "*/15 1-5 * * mon-fri", "@daily", "0 2 1,15 * *"):
        assert setup_formats.valid_schedule(good), good
    for bad in ("0 2 * *", "every night", "0 2 * * * rm", "", "0 2 * * ; x"):
        assert not setup_formats.valid_schedule(bad), bad


# ---- alfresco-global.properties --------------------------------------------------------------------------
def test_parse_properties_and_jdbc_url():
    text = ("# comment\n! also\ndir.root=/opt/alf/alf_data\ndb.username = alfresco\ndb.password:s\\=cr\\\\t\n"
            "db.host=dbhost\ndb.port=5433\ndb.name=alf\ndb.url=jdbc:postgresql://${db.host}:${db.port}/"
            "${db.name}?ssl=false\nlong.value=one \\\n    two\nsystem.content.eagerOrphanCleanup=true\n")
    props = setup_formats.parse_properties(text)
    assert props["db.username"] == "alfresco" and props["db.password"] == "s=cr\\t"
    assert props["long.value"] == "one two" and props["dir.root"] == "/opt/alf/alf_data"
    assert setup_formats.parse_jdbc_url(props["db.url"]) == {"host": "dbhost", "port": "5433", "database": "alf"}
    assert setup_formats.parse_jdbc_url("jdbc:postgresql://localhost/alfresco") == {"host": "localhost",
                                                                                    "database": "alfresco"}
    assert setup_formats.parse_jdbc_url("jdbc:mysql://x/y") == {}


# ---- answers, prompts, psql output ------------------------------------------------------------------------
def test_load_answers_reads_dotenv_format_and_rejects_unknown_keys(tmp_path, capsys):
    path = tmp_path / "answers.env"
    path.write_text("PGUSER=alfresco\nPGSUPERPASSWORD='p#ss w'\nCRON_SCHEDULE=\"0 2 * * *\"\n"
                    "RESTART_POSTGRES=yes\nVENV_DIR=/work/main/.venv\nAPPLY_CRON=no\n")
    os.chmod(str(path), 0o644)
    answers = setup_answers.load_answers(str(path))
    assert answers["PGSUPERPASSWORD"] == "p#ss w" and answers["CRON_SCHEDULE"] == "0 2 * * *"
    assert "readable by other users" in capsys.readouterr().err
    path.write_text("PGUSER=alfresco\nRESTART_POSTGRESS=yes\n")
    with pytest.raises(AnswerError, match="RESTART_POSTGRESS"):
        setup_answers.load_answers(str(path))
    with pytest.raises(AnswerError, match="cannot read"):
        setup_answers.load_answers(str(tmp_path / "missing.env"))


def test_non_interactive_ui_takes_answers_and_defaults():
    ui = setup_answers.Ui(False, {"A": "given", "APPLY_CRON": "no", "RESTART_POSTGRES": "yes"})
    assert ui.ask("A", "a", "default") == "given" and ui.ask("B", "b", "default") == "default"
    assert ui.confirm("APPLY_CRON", "?") is False and ui.confirm("APPLY_HBA", "?") is True
    assert ui.confirm("RESTART_POSTGRES", "?", default=False) is True
    assert ui.confirm("OTHER", "?", default=False) is False
    with pytest.raises(AnswerError, match="B: bad"):
        ui.ask("B", "b", "x", check=lambda v: "bad")


def test_parse_bool_row_is_strict():
    assert setup_sys.parse_bool_row("t|f\n") == (True, False)
    for bad in ("", "rolreplication\nt", "t\nt", "true", "x|t"):
        with pytest.raises(SetupError):
            setup_sys.parse_bool_row(bad)


# ---- Tomcat stop fallback (real processes) ------------------------------------------------------------------
def _spawn_sleep():
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


def test_stop_tomcat_signals_only_the_pid_file_process_when_the_script_hangs(tmp_path):
    base = tmp_path / "alfresco"
    (base / "tomcat" / "temp").mkdir(parents=True)
    (base / "tomcat" / "logs").mkdir()
    script = base / "alfresco.sh"
    script.write_text("#!/bin/bash\nsleep 60\n")  # a stop that hangs, as old bundles' can
    script.chmod(0o755)
    tomcat, bystander = _spawn_sleep(), _spawn_sleep()
    try:
        (base / "tomcat" / "temp" / "catalina.pid").write_text("%d\n" % tomcat.pid)
        alfresco = setup_service.Alfresco(str(base), lambda text: None, grace=1)
        assert alfresco.tomcat_pid() == tomcat.pid
        started = time.monotonic()
        alfresco.stop_tomcat(timeout=2)
        assert tomcat.wait(timeout=10) == -signal.SIGTERM
        assert bystander.poll() is None and time.monotonic() - started < 60
        assert alfresco.tomcat_pid() is None
    finally:
        for proc in (tomcat, bystander):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_tomcat_pid_ignores_a_stale_pid_file(tmp_path):
    (tmp_path / "tomcat" / "temp").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "tomcat" / "temp" / "catalina.pid").write_text("%d\n" % dead.pid)
    assert setup_service.Alfresco(str(tmp_path), print).tomcat_pid() is None
    (tmp_path / "tomcat" / "temp" / "catalina.pid").write_text("1\n")
    assert setup_service.Alfresco(str(tmp_path), print).tomcat_pid() is None


def test_start_tomcat_waits_for_a_new_startup_line(tmp_path):
    base = tmp_path
    (base / "tomcat" / "logs").mkdir(parents=True)
    out = base / "tomcat" / "logs" / "catalina.out"
    out.write_text("INFO: Server startup in 999 ms\n")  # an old start must not count
    script = base / "alfresco.sh"
    script.write_text("#!/bin/bash\n(sleep 1; echo 'INFO: Server startup in 5 ms' >> '%s') &\nexit 1\n" % out)
    script.chmod(0o755)
    setup_service.Alfresco(str(base), lambda text: None).start_tomcat(timeout=30)
    script.write_text("#!/bin/bash\nexit 0\n")
    with pytest.raises(SetupError, match="Server startup in"):
        setup_service.Alfresco(str(base), lambda text: None).start_tomcat(timeout=2)


# ---- detection and the .env step (files only, no server) -----------------------------------------------
def test_detect_reads_the_install_and_warns_about_eager_orphan_cleanup(tmp_path):
    import setup_steps

    base = tmp_path / "alfresco"
    pgdata = base / "alf_data" / "postgresql"
    pgdata.mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("9.4\n")
    (pgdata / "postmaster.pid").write_text("4242\n%s\n1700000000\n5433\n/tmp/alf-sock\n127.0.0.1\n" % pgdata)
    props = base / "tomcat" / "shared" / "classes"
    props.mkdir(parents=True)
    (props / "alfresco-global.properties").write_text(
        "dir.root=/srv/alf_data\ndb.username=alf\ndb.password=s3cret\ndb.name=alfdb\n"
        "db.url=jdbc:postgresql://localhost:5433/${db.name}\nsystem.content.eagerOrphanCleanup=true\n")
    facts = setup_steps.detect(None, str(base))
    assert facts["pgdata"] == str(pgdata) and facts["pg_version"] == "9.4"
    assert facts["socket_dir"] == "/tmp/alf-sock" and facts["port"] == "5433" and facts["script"] is None
    assert any("eagerOrphanCleanup" in w for w in facts["warnings"])
    assert setup_steps.detected_env(facts) == {
        "ALF_BASE_DIR": str(base), "PGHOST": "/tmp/alf-sock", "PGPORT": "5433", "PGUSER": "alf",
        "PGPASSWORD": "s3cret", "PGDATABASE": "alfdb", "CONTENTSTORE_DIR": "/srv/alf_data/contentstore"}
    with pytest.raises(AnswerError, match="not a directory"):
        setup_steps.detect(None, str(tmp_path / "missing"))


def test_env_step_shows_a_diff_without_secrets_and_keeps_an_equal_file(tmp_path):
    import io

    import config
    import setup_steps

    env_path = str(tmp_path / ".env")
    values = {"PGUSER": "alfresco", "PGPASSWORD": "old-secret", "ALF_BASE_DIR": "/opt/a", "BACKUP_DIR": "/b"}
    existing = setup_files.format_env(values, config.OPTIONS)
    with open(env_path, "w") as handle:
        handle.write(existing)
    os.chmod(env_path, 0o600)
    out = io.StringIO()
    ctx = setup_steps.Context(setup_answers.Ui(False, {}), "/p", env_path, dry_run=True, out=out)
    ctx.service_user = setup_sys.me()
    ctx.values = dict(values, PGPASSWORD="new-secret", RETENTION_DAYS="9")
    setup_steps.write_env(ctx, existing)
    shown = out.getvalue()
    assert "-PGPASSWORD='********'" in shown and "+PGPASSWORD='******** (new value)'" in shown
    assert "+RETENTION_DAYS='9'" in shown and "secret" not in shown.replace("(secret)", "")
    assert ctx.results[-1][1] == setup_steps.WOULD
    ctx.values = dict(values)  # same meaning, the file is kept as it is
    setup_steps.write_env(ctx, existing)
    assert ctx.results[-1][1] == setup_steps.UNCHANGED


def test_a_failing_pip_install_is_reported_as_a_failure(tmp_path):
    import io

    import setup_finish
    import setup_steps

    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("this is === not a requirement\n")  # pip fails, no network needed
    ctx = setup_steps.Context(setup_answers.Ui(False, {}), str(project), str(tmp_path / ".env"), False,
                              out=io.StringIO())
    ctx.service_user = setup_sys.me()
    venv = str(tmp_path / "venv")
    with pytest.raises(SetupError, match=r"pip install failed \(exit code [1-9]") as caught:
        setup_finish.venv_step(ctx, venv)
    assert "is NOT usable" in str(caught.value)
    assert os.access(os.path.join(venv, "bin", "python"), os.X_OK)  # the venv itself was made
    assert not [r for r in ctx.results if r[0] == "venv"]
