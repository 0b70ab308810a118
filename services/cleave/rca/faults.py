"""``cleave fault``: labelled faults injected into a running local platform (``cleave up``),
so that root-cause analysis can be tested end to end against a known answer.

No code inside the services takes part; every mechanism acts from outside on the
processes of the launcher's table (``$CLEAVE_HOME/run``):

* ``throttle``: a SIGSTOP/SIGCONT duty cycle (``--intensity`` is the share of each
  ``PERIOD_SECONDS`` stopped), the process runs slower as a CPU-starved one does;
* ``stop``: SIGSTOP for the whole duration (a stall);
* ``kill``: SIGKILL, then after the duration the launcher starts the process again with
  its recorded command line;
* ``flood``: ``--intensity`` concurrent long-output requests at the router for the duration.

Each fault is a JSON record under ``$CLEAVE_HOME/faults/`` (:class:`FaultRecord`): kind,
target process, the components it acts on, start, planned end, mechanism, and, once it is
over, when it ended. A detached injector process (``python -m cleave.rca.faults run ID``,
its own session) carries the fault out and ends it by itself after ``--duration``;
``cleave fault clear`` ends every active fault at once. Whatever way a fault ends, a
stopped process gets SIGCONT and a killed one is started again."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from cleave.common.config import cleave_home
from cleave.launcher import ProcessSpec, ProcessState, Supervisor, is_alive, signal_group, wait_until

PERIOD_SECONDS = 0.25
RESTART_TIMEOUT_SECONDS = 240.0
FLOOD_MAX_TOKENS = 200
FLOOD_PROMPT_TOKENS = 8


@dataclass(frozen=True, slots=True)
class FaultKind:
    role: str  # the role of the process acted on; "redis" for the Redis server
    mechanism: str  # throttle, stop, kill or flood
    intensity: float  # the default: share of time stopped (throttle), concurrent requests (flood)
    help: str


KINDS: dict[str, FaultKind] = {
    "kvstore-slow": FaultKind("kvstore", "throttle", 0.8, "KV store throttled by a SIGSTOP/SIGCONT duty cycle"),
    "kvstore-kill": FaultKind("kvstore", "kill", 0.0, "KV store killed (SIGKILL), restarted after the duration"),
    "expert-slow": FaultKind("expert", "throttle", 0.8, "expert replica throttled by a SIGSTOP/SIGCONT duty cycle"),
    "expert-kill": FaultKind("expert", "kill", 0.0, "expert replica killed (SIGKILL), restarted after the duration"),
    "decode-overload": FaultKind("decode", "flood", 24, "concurrent long-output requests at the router overload the decode pool"),
    "redis-latency": FaultKind("redis", "throttle", 0.8, "Redis server throttled: every command waits"),
    "prefill-stall": FaultKind("prefill", "stop", 0.0, "prefill worker stopped (SIGSTOP) for the duration"),
}


@dataclass(slots=True)
class FaultRecord:
    """One injected fault, as ``$CLEAVE_HOME/faults/<id>.json``.

    ``target``: the process acted on (``kvstore-0``, ``redis``; ``router`` for a flood);
    ``components``: the components that are the root cause (for a flood, every decode
    worker); ``start``/``end``: epoch seconds, ``end`` as planned; ``ended_at``: when it
    was over (None while active); ``state``: ``active``, ``ended`` or ``cleared``."""

    id: str
    kind: str
    target: str
    components: list[str]
    mechanism: str
    intensity: float
    start: float
    end: float
    target_pid: int | None = None
    injector_pid: int | None = None
    state: str = "active"
    ended_at: float | None = None
    detail: dict[str, str] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.end - self.start


class FaultError(RuntimeError):
    """The fault cannot be injected or cleared; the message says why."""


def faults_dir() -> Path:
    return cleave_home() / "faults"


def _path(fault_id: str) -> Path:
    return faults_dir() / f"{fault_id}.json"


def save(record: FaultRecord) -> None:
    path = _path(record.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    tmp.replace(path)  # a reader never sees half a record


def load(fault_id: str) -> FaultRecord:
    return FaultRecord(**json.loads(_path(fault_id).read_text()))


def records() -> list[FaultRecord]:
    """Every recorded fault, oldest first."""
    out = []
    for path in sorted(faults_dir().glob("*.json")) if faults_dir().is_dir() else []:
        try:
            out.append(FaultRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(out, key=lambda r: r.start)


def role_of(process_name: str) -> str:
    """``kvstore-0`` -> ``kvstore``; ``redis`` -> ``redis``."""
    return process_name.rsplit("-", 1)[0] if process_name[-1:].isdigit() else process_name


def _pick_target(supervisor: Supervisor, kind: FaultKind, target: str | None) -> ProcessState:
    running = [s for s in supervisor.states() if supervisor.is_alive(s)]
    if not running:
        raise FaultError("cleave is not running here (no live process under $CLEAVE_HOME/run); start it with cleave up")
    if kind.mechanism == "flood":
        target = "router"
    candidates = sorted((s for s in running if role_of(s.name) == kind.role), key=lambda s: s.name)
    if target is not None:
        chosen = next((s for s in running if s.name == target), None)
        if chosen is None or role_of(chosen.name) != (kind.role if kind.mechanism != "flood" else "router"):
            names = ", ".join(s.name for s in candidates) or "none running"
            raise FaultError(f"no running {kind.role} process named {target!r} (running: {names})")
        return chosen
    if not candidates:
        raise FaultError(f"no running {kind.role} process in the platform's process table")
    return candidates[0]


def inject(kind_name: str, target: str | None = None, duration: float = 60.0,
           intensity: float | None = None) -> FaultRecord:
    """Start a fault and its detached injector; returns its record (state ``active``)."""
    if kind_name not in KINDS:
        raise FaultError(f"unknown fault kind {kind_name!r}; kinds: {', '.join(KINDS)}")
    kind = KINDS[kind_name]
    if not 0 < duration <= 3600:
        raise FaultError(f"--duration must be in (0, 3600] seconds, got {duration:g}")
    intensity = kind.intensity if intensity is None else intensity
    if kind.mechanism == "throttle" and not 0.05 <= intensity <= 0.95:
        raise FaultError(f"--intensity of {kind_name} is the share of time stopped, in [0.05, 0.95]; got {intensity:g}")
    if kind.mechanism == "flood" and not 1 <= intensity <= 256:
        raise FaultError(f"--intensity of {kind_name} is the number of concurrent requests, in [1, 256]; got {intensity:g}")
    supervisor = Supervisor(cleave_home() / "run")
    state = _pick_target(supervisor, kind, target)
    busy = [r for r in records() if r.state == "active" and r.target == state.name]
    if busy:
        raise FaultError(f"{state.name} already has an active fault ({busy[0].id}); cleave fault clear ends it")
    if kind.mechanism == "flood":
        decode = sorted(s.name for s in supervisor.states() if role_of(s.name) == "decode" and supervisor.is_alive(s))
        components, detail = decode, {"url": state.info.get("url", ""), "model": state.info.get("model", "")}
        if not detail["url"]:
            raise FaultError("the router's process record has no API url to send the flood to")
    else:
        components, detail = [state.name], {}
    now = time.time()
    record = FaultRecord(
        id=f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}-{int(now * 1000) % 1000:03d}-{kind_name}",
        kind=kind_name, target=state.name, components=components, mechanism=kind.mechanism,
        intensity=float(intensity), start=now, end=now + duration, target_pid=state.pid, detail=detail,
    )
    save(record)
    log = faults_dir() / f"{record.id}.log"
    with open(log, "ab") as out:
        # From here on only the injector writes the record, until it has exited.
        injector = subprocess.Popen([sys.executable, "-m", "cleave.rca.faults", "run", record.id],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    # The fault has begun once the injector says so (a kill is done, the first stop sent).
    if not wait_until(lambda: load(record.id).detail.get("begun") or injector.poll() is not None, 30.0):
        record.injector_pid = injector.pid
        save(record)
        clear(record.id)
        raise FaultError(f"the injector of {record.id} did not start; see {log}")
    if injector.poll() not in (None, 0):
        raise FaultError(f"the injector of {record.id} failed; see {log}")
    return load(record.id)


# -- the injector (a detached process) ------------------------------------------------------


def _interruptible_sleep(until: float, stop: threading.Event) -> None:
    stop.wait(max(0.0, until - time.time()))


def _throttle(record: FaultRecord, stop: threading.Event) -> None:
    stopped = record.intensity * PERIOD_SECONDS
    try:
        while not stop.is_set() and time.time() < record.end:
            signal_group(record.target_pid, signal.SIGSTOP)
            stop.wait(stopped)
            signal_group(record.target_pid, signal.SIGCONT)
            stop.wait(PERIOD_SECONDS - stopped)
    finally:
        signal_group(record.target_pid, signal.SIGCONT)


def _stall(record: FaultRecord, stop: threading.Event) -> None:
    try:
        signal_group(record.target_pid, signal.SIGSTOP)
        _interruptible_sleep(record.end, stop)
    finally:
        signal_group(record.target_pid, signal.SIGCONT)


def restart(name: str, argv: list[str], health_url: str | None, info: dict[str, str]) -> ProcessState:
    """Start a process of the platform again, as ``cleave up`` started it, and wait until it is ready."""
    supervisor = Supervisor(cleave_home() / "run")
    state = supervisor.start(ProcessSpec(name, argv, health_url=health_url, info=info))
    supervisor.wait_healthy(state, RESTART_TIMEOUT_SECONDS)
    return state


def _kill(record: FaultRecord, stop: threading.Event) -> None:
    supervisor = Supervisor(cleave_home() / "run")
    state = supervisor.state(record.target)
    if state is None or state.pid != record.target_pid:
        raise FaultError(f"{record.target} is no longer the process {record.target_pid}")
    signal_group(state.pid, signal.SIGKILL)
    wait_until(lambda: not supervisor.is_alive(state), 10.0)
    _mark_begun(record)
    _interruptible_sleep(record.end, stop)
    restart(state.name, state.argv, state.health_url, state.info)


def _flood(record: FaultRecord, stop: threading.Event) -> None:
    import httpx

    url, model = record.detail["url"], record.detail["model"]

    def client(seed: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(10.0, read=max(10.0, record.end - time.time() + 5))) as http:
            n = 0
            while not stop.is_set() and time.time() < record.end:
                prompt = [(seed * 31 + n * 7 + i) % 97 + 3 for i in range(FLOOD_PROMPT_TOKENS)]
                n += 1
                try:
                    answer = http.post(f"{url}/completions", json={
                        "model": model, "prompt": prompt, "max_tokens": FLOOD_MAX_TOKENS, "temperature": 0,
                        "ignore_eos": True})
                    refused = answer.status_code != 200
                except httpx.HTTPError:
                    refused = True
                if refused:
                    stop.wait(0.2)  # the router refusing or away: try again, but do not spin

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(int(record.intensity))]
    for thread in threads:
        thread.start()
    _mark_begun(record)
    _interruptible_sleep(record.end, stop)
    stop.set()


MECHANISMS = {"throttle": _throttle, "stop": _stall, "kill": _kill, "flood": _flood}


def _mark_begun(record: FaultRecord) -> None:
    """The fault is in effect from now: its start and planned end move here."""
    current = load(record.id)
    now = time.time()
    current.detail["begun"] = f"{now:.3f}"
    current.start, current.end = now, now + current.duration
    record.start, record.end = current.start, current.end
    save(current)


def run_injector(fault_id: str) -> int:
    """Carry out fault ``fault_id`` until its end or SIGTERM/SIGINT, then restore and
    record when it ended."""
    record = load(fault_id)
    record.injector_pid = os.getpid()
    save(record)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    status = 0
    try:
        if record.mechanism in ("throttle", "stop"):
            # The first stop is sent within microseconds of this mark.
            _mark_begun(record)
        MECHANISMS[record.mechanism](record, stop)
    except Exception as exc:  # noqa: BLE001 - recorded for `cleave fault list`, and the exit status says so
        print(f"fault {fault_id} failed: {exc!r}", flush=True)
        current = load(fault_id)
        current.detail["error"] = str(exc)
        save(current)
        status = 1
    finally:
        current = load(fault_id)
        if current.state == "active":
            current.state = "cleared" if stop.is_set() and time.time() < current.end else "ended"
        current.ended_at = time.time()
        save(current)
    return status


# -- clear -----------------------------------------------------------------------------------


def clear(fault_id: str | None = None, timeout: float = RESTART_TIMEOUT_SECONDS + 30) -> list[FaultRecord]:
    """End the active faults (all, or ``fault_id``): their injectors restore what they
    changed (SIGCONT, a restart); SIGCONT again in case an injector died. Returns them."""
    active = [r for r in records() if r.state == "active" and (fault_id is None or r.id == fault_id)]
    for record in active:
        if record.injector_pid and is_alive(record.injector_pid):
            os.kill(record.injector_pid, signal.SIGTERM)
    for record in active:
        if record.injector_pid:
            wait_until(lambda: not is_alive(record.injector_pid), timeout)
        _restore(record, "cleared")
    return [load(r.id) for r in active]


def _restore(record: FaultRecord, state: str) -> None:
    """Undo what a fault whose injector is gone left behind: SIGCONT a stopped target,
    start a killed one again; then close its record."""
    if record.mechanism in ("throttle", "stop") and record.target_pid and is_alive(record.target_pid):
        signal_group(record.target_pid, signal.SIGCONT)
    current = load(record.id)
    if current.state != "active":
        return
    if record.mechanism == "kill":
        known = Supervisor(cleave_home() / "run").state(record.target)
        if known is not None and not is_alive(known.pid, known.start_ticks):
            restart(known.name, known.argv, known.health_url, known.info)
    current.state, current.ended_at = state, time.time()
    save(current)


def reap_orphans() -> list[FaultRecord]:
    """Active faults whose injector died (killed, or the machine's OOM killer): restored
    and closed as ``ended``, with the reason in ``detail``."""
    orphans = [r for r in records() if r.state == "active" and r.injector_pid and not is_alive(r.injector_pid)]
    for record in orphans:
        current = load(record.id)
        current.detail["error"] = f"the injector (pid {record.injector_pid}) died; restored by {os.getpid()}"
        save(current)
        _restore(current, "ended")
    return [load(r.id) for r in orphans]


def wait_ended(fault_id: str, timeout: float) -> FaultRecord:
    """The record once its fault is over (its injector exited); FaultError after ``timeout``."""
    if not wait_until(lambda: load(fault_id).state != "active", timeout, interval=0.2):
        raise FaultError(f"fault {fault_id} still active after {timeout:.0f}s")
    return load(fault_id)


# -- the command -------------------------------------------------------------------------------


def _describe(record: FaultRecord) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(record.start))
    until = time.strftime("%H:%M:%S", time.localtime(record.ended_at or record.end))
    error = f" error: {record.detail['error']}" if record.detail.get("error") else ""
    return (f"{record.id:<44} {record.kind:<16} {record.target:<11} {record.mechanism:<8} "
            f"{when}-{until} {record.state}{error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleave fault", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    inject_p = sub.add_parser("inject", help="inject a fault into the running platform")
    inject_p.add_argument("kind", choices=sorted(KINDS), help="; ".join(f"{k}: {v.help}" for k, v in KINDS.items()))
    inject_p.add_argument("--target", help="process to act on (default: the first of the kind's role, e.g. kvstore-0)")
    inject_p.add_argument("--duration", type=float, default=60.0, help="seconds until the fault ends by itself")
    inject_p.add_argument("--intensity", type=float,
                          help="throttle: share of time stopped (default 0.8); decode-overload: concurrent requests (24)")
    inject_p.add_argument("--json", action="store_true", help="print the fault's record as JSON")
    inject_p.add_argument("--wait", action="store_true", help="return once the fault has ended")
    list_p = sub.add_parser("list", help="faults injected here, newest last")
    list_p.add_argument("--json", action="store_true")
    clear_p = sub.add_parser("clear", help="end every active fault (or one) now")
    clear_p.add_argument("id", nargs="?")
    clear_p.add_argument("--json", action="store_true", help="print the cleared faults' records as JSON")
    sub.add_parser("run").add_argument("id")  # the detached injector
    return parser


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``cleave fault``."""
    args = build_parser().parse_args(argv)
    try:
        if args.action == "run":
            return run_injector(args.id)
        reap_orphans()
        if args.action == "inject":
            record = inject(args.kind, args.target, args.duration, args.intensity)
            if args.wait:
                record = wait_ended(record.id, args.duration + RESTART_TIMEOUT_SECONDS + 30)
            print(json.dumps(asdict(record), indent=2) if args.json else _describe(record))
            return 0
        if args.action == "list":
            found = records()
            if args.json:
                print(json.dumps([asdict(r) for r in found], indent=2))
            else:
                print("\n".join(_describe(r) for r in found) or "no faults injected")
            return 0
        cleared = clear(args.id)
        if args.json:
            print(json.dumps([asdict(r) for r in cleared], indent=2))
        else:
            print("\n".join(_describe(r) for r in cleared) or "no active fault")
        return 0
    except FaultError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run_command("fault", sys.argv[1:]))
