"""The README's option table and env.example are generated from config.OPTIONS: keep them in sync."""

import os
import re

import config_docs

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(PROJECT, name), encoding="utf-8") as handle:
        return handle.read()


def test_env_example_is_generated_from_the_option_table():
    assert read("env.example") == config_docs.env_example() + "\n", "run: python config.py --env-example > env.example"


def test_readme_option_table_is_generated_from_the_option_table():
    match = re.search(r"<!-- options:begin -->\n(.*?)\n<!-- options:end -->", read("README.md"), re.S)
    assert match, "README.md lost its options markers"
    assert match.group(1) == config_docs.markdown_table(), "regenerate the README table: python config.py --markdown"


def test_readme_documents_every_exit_code_and_the_make_targets():
    readme = read("README.md")
    import backup

    for code in backup.EXIT_CODES:
        assert "| %d |" % code in readme
    for command in ("make demo", "make test", "--status", "--check", "--dry-run", "archive-push"):
        assert command in readme


def test_readme_documents_the_wizard_exit_codes_and_answer_keys():
    import setup
    import setup_answers

    readme = read("README.md")
    for code in setup.EXIT_CODES:
        assert "%d " % code in readme.split("Exit codes of `setup.py`")[1][:600]
    for key in setup_answers.WIZARD_KEYS:
        assert "`%s`" % key in readme, key
