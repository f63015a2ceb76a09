"""The embedded model's one-off conversion: two processes starting at once convert once and both find it."""

from __future__ import annotations

import threading
import time

import pytest

from adapters import basemodel


def test_two_first_uses_at_once_convert_once(tmp_path, monkeypatch):
    target = tmp_path / "models" / "converted"
    calls = []

    def slow_convert(t):
        calls.append(t)
        time.sleep(0.3)  # long enough for the other caller to arrive while this one converts
        t.mkdir(parents=True)
        (t / "config.json").write_text("{}")

    monkeypatch.setattr(basemodel, "converted_dir", lambda: target)
    monkeypatch.setattr(basemodel, "_convert_embedded", slow_convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(basemodel.local_path(None))) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(calls) == 1
    assert got == [str(target), str(target)]


def test_publishing_beside_a_finished_conversion_keeps_it(tmp_path):
    target, tmp = tmp_path / "converted", tmp_path / ".convert-x"
    target.mkdir()
    (target / "config.json").write_text('{"theirs": 1}')
    tmp.mkdir()
    (tmp / "config.json").write_text('{"ours": 1}')
    basemodel._publish(tmp, target)
    assert (target / "config.json").read_text() == '{"theirs": 1}'
    assert not tmp.exists()


def test_publishing_over_a_broken_entry_still_fails(tmp_path):
    target, tmp = tmp_path / "converted", tmp_path / ".convert-x"
    target.mkdir()
    (target / "stray").write_text("x")  # not a conversion: no config.json
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    with pytest.raises(OSError):
        basemodel._publish(tmp, target)
