"""cleave fault without a platform: stand-in processes recorded in the launcher's table
under a temporary CLEAVE_HOME take the faults. A throttle stops and resumes its target and
ends by itself, a stall is cleared early and leaves nothing stopped, a kill is followed by a
restart from the recorded command line, and bad requests get clear errors."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from cleave.launcher import ProcessSpec, Supervisor, is_alive, wait_until
from cleave.rca import faults

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path))
    supervisor = Supervisor(tmp_path / "run")
    for name in ("kvstore-0", "prefill-0"):
        supervisor.start(ProcessSpec(name, SLEEPER))
    yield supervisor
    faults.clear()
    for state in supervisor.states():
        supervisor.stop(state, timeout=5)


def test_throttle_stops_and_resumes_its_target_and_ends_by_itself(home):
    target = home.state("kvstore-0")
    record = faults.inject("kvstore-slow", duration=2.0, intensity=0.5)
    assert (record.kind, record.target, record.components, record.mechanism) == \
        ("kvstore-slow", "kvstore-0", ["kvstore-0"], "throttle")
    assert record.target_pid == target.pid and record.state == "active" and record.end - record.start == pytest.approx(2.0)
    assert wait_until(lambda: proc_state(target.pid) == "T", 2.0, interval=0.01), "never stopped"
    assert wait_until(lambda: proc_state(target.pid) != "T", 2.0, interval=0.01), "never resumed"
    ended = faults.wait_ended(record.id, 10)
    assert ended.state == "ended" and ended.ended_at >= ended.end and proc_state(target.pid) != "T"
    assert [r.id for r in faults.records()] == [record.id]


def test_a_stall_cleared_early_leaves_nothing_stopped(home):
    target = home.state("prefill-0")
    record = faults.inject("prefill-stall", duration=60)
    assert wait_until(lambda: proc_state(target.pid) == "T", 2.0, interval=0.01)
    cleared = faults.clear()
    assert [r.id for r in cleared] == [record.id] and cleared[0].state == "cleared"
    assert cleared[0].ended_at < record.end and proc_state(target.pid) != "T"
    assert faults.clear() == []


def test_a_kill_is_followed_by_a_restart(home):
    before = home.state("kvstore-0")
    record = faults.inject("kvstore-kill", duration=0.5)
    assert not is_alive(before.pid, before.start_ticks)
    faults.wait_ended(record.id, 30)
    after = home.state("kvstore-0")
    assert after.pid != before.pid and after.argv == before.argv and home.is_alive(after)


@pytest.mark.parametrize("kind, kwargs, message", [
    ("disk-full", {}, "unknown fault kind"),
    ("kvstore-slow", {"intensity": 1.0}, "share of time stopped"),
    ("decode-overload", {"intensity": 0}, "concurrent requests"),
    ("kvstore-slow", {"duration": 0}, "--duration"),
    ("kvstore-slow", {"target": "kvstore-7"}, "no running kvstore process named 'kvstore-7'"),
    ("kvstore-slow", {"target": "prefill-0"}, "no running kvstore process named 'prefill-0'"),
    ("expert-kill", {}, "no running expert process"),
])
def test_bad_requests_are_refused_with_the_reason(home, kind, kwargs, message):
    with pytest.raises(faults.FaultError, match=message):
        faults.inject(kind, **kwargs)
    assert faults.records() == []


def test_one_fault_per_target_and_none_without_a_platform(home, tmp_path, monkeypatch, capsys):
    record = faults.inject("prefill-stall", duration=60)
    with pytest.raises(faults.FaultError, match=f"already has an active fault \\({record.id}\\)"):
        faults.inject("prefill-stall")
    assert faults.run_command("fault", ["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["state"]) for r in listed] == [(record.id, "active")]
    faults.clear()
    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path / "elsewhere"))
    assert faults.run_command("fault", ["inject", "kvstore-slow"]) == 1
    assert "cleave is not running here" in capsys.readouterr().err


def test_a_fault_whose_injector_died_is_restored_by_the_next_command(home, capsys):
    target = home.state("prefill-0")
    record = faults.inject("prefill-stall", duration=60)
    assert wait_until(lambda: proc_state(target.pid) == "T", 2.0, interval=0.01)
    os.kill(record.injector_pid, signal.SIGKILL)
    assert wait_until(lambda: not is_alive(record.injector_pid), 5)
    assert proc_state(target.pid) == "T"  # nobody restored it yet
    assert faults.run_command("fault", ["list"]) == 0
    assert proc_state(target.pid) != "T"
    ended = faults.load(record.id)
    assert ended.state == "ended" and "injector" in ended.detail["error"] and record.id in capsys.readouterr().out
