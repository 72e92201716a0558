"""Tests for guided_diffusion.logger: the reference's output formats and configuration rules."""

import csv
import json
import os

from guided_diffusion import logger


def _read(path):
    with open(path) as f:
        return f.read()


def test_dumpkvs_writes_table_csv_and_json(tmp_path, capsys):
    with logger.scoped_configure(dir=str(tmp_path), format_strs=["stdout", "log", "csv", "json"]):
        logger.logkv("step", 0)
        logger.logkv_mean("loss", 1.0)
        logger.logkv_mean("loss", 2.0)
        out = logger.dumpkvs()
        assert out == {"step": 0, "loss": 1.5}
        assert logger.getkvs() == {}
        logger.logkv("step", 1)
        logger.logkv("a_new_key", "x")
        logger.dumpkvs()
    table = _read(tmp_path / "log.txt")
    assert "| loss | 1.5      |" in table
    assert "| step | 0        |" in table
    lines = table.splitlines()
    # rows sorted by lower-cased key, framed by dashes of width keywidth + valwidth + 7
    start = lines.index("-" * (4 + 8 + 7))
    assert lines[start + 1: start + 4] == ["| loss | 1.5      |", "| step | 0        |", "-" * 19]
    assert "1.5" in capsys.readouterr().out
    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["loss", "step", "a_new_key"]
    assert rows[1] == ["1.5", "0", ""]  # the old row padded when a key appears
    assert rows[2] == ["", "1", "x"]
    records = [json.loads(x) for x in _read(tmp_path / "progress.json").splitlines()]
    assert records[0] == {"loss": 1.5, "step": 0}


def test_long_keys_and_values_are_truncated(tmp_path):
    with logger.scoped_configure(dir=str(tmp_path), format_strs=["log"]):
        logger.logkv("k" * 40, "v" * 40)
        logger.dumpkvs()
    table = _read(tmp_path / "log.txt")
    assert "k" * 27 + "..." in table and "v" * 27 + "..." in table


def test_log_levels_filter_messages(tmp_path):
    with logger.scoped_configure(dir=str(tmp_path), format_strs=["log"]):
        logger.debug("hidden-debug")
        logger.info("shown", "info")
        logger.set_level(logger.ERROR)
        logger.warn("hidden-warn")
        logger.error("shown-error")
    text = _read(tmp_path / "log.txt")
    assert "shown info" in text and "shown-error" in text
    assert "hidden" not in text


def test_configure_uses_openai_logdir_and_default_formats(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "run"))
    monkeypatch.delenv("OPENAI_LOG_FORMAT", raising=False)
    monkeypatch.delenv("PMI_RANK", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK", raising=False)
    prev = logger.Logger.CURRENT
    try:
        logger.configure()
        assert logger.get_dir() == str(tmp_path / "run")
        logger.logkv("x", 1)
        logger.dumpkvs()
        assert sorted(os.listdir(tmp_path / "run")) == ["log.txt", "progress.csv"]
        assert "Logging to" in _read(tmp_path / "run" / "log.txt")
    finally:
        logger.get_current().close()
        logger.Logger.CURRENT = prev


def test_configure_without_logdir_uses_timestamped_tempdir(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    prev = logger.Logger.CURRENT
    try:
        logger.configure(format_strs=["log"])
        d = logger.get_dir()
        assert os.path.dirname(d) == str(tmp_path)
        assert os.path.basename(d).startswith("openai-")
    finally:
        logger.get_current().close()
        logger.Logger.CURRENT = prev


def test_other_ranks_write_only_a_suffixed_log(tmp_path, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.delenv("OPENAI_LOG_FORMAT_MPI", raising=False)
    with logger.scoped_configure(dir=str(tmp_path)):
        logger.logkv("x", 1)
        logger.dumpkvs()
    assert os.listdir(tmp_path) == ["log-rank001.txt"]


def test_profile_kv_records_wait_time(tmp_path):
    with logger.scoped_configure(dir=str(tmp_path), format_strs=["log"]):

        @logger.profile("work")
        def work():
            return 3

        assert work() == 3
        assert "wait_work" in logger.getkvs()
        assert logger.getkvs()["wait_work"] >= 0.0
