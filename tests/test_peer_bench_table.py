"""bench/peer_vllm.py's table over repeated rounds: each ratio is taken within a round (a
Cleave server against the vLLM of the same round) and summarised by its median, lowest and
highest, so a noisy round moves the spread, not the claim."""

import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peer_vllm  # noqa: E402

ARGS = types.SimpleNamespace(model="m", input_len=128, output_len=32, num_prompts=50, locust_users=8,
                             locust_time=0, server_core="1", client_core="0", request_rates="")


def figures(tokens_per_s: float, ttft_ms: float) -> dict:
    return {"c=1": {"output_throughput": tokens_per_s, "mean_ttft_ms": ttft_ms,
                    "cpu_ms_per_token": {"total": ttft_ms / 10, "router": 0.1}}}


def table_rows(rounds, capsys) -> dict[tuple[str, str], list[str]]:
    peer_vllm.print_table(ARGS, ["vllm", "single"], rounds, [])
    rows = [[cell.strip() for cell in line[1:-1].split("|")] for line in capsys.readouterr().out.splitlines() if line.startswith("| c=1")]
    return {(row[0], row[1]): row[2:] for row in rows}


def test_repeated_rounds_give_the_median_of_each_rounds_ratio(capsys):
    rounds = [{"vllm": figures(100, 10), "single": figures(200, 5)},
              {"vllm": figures(50, 20), "single": figures(60, 30)},  # a slow round for both
              {"vllm": figures(100, 10), "single": figures(150, 9)}]
    rows = table_rows(rounds, capsys)
    # Medians of the figures; ratios 2.0/1.2/1.5 and 0.5/1.5/0.9 give medians 1.5 and 0.9.
    assert rows[("c=1", "output tok/s")] == ["100.00", "150.00", "1.50x (1.20-2.00)"]
    assert rows[("c=1", "TTFT mean ms")] == ["10.00", "9.00", "0.90x (0.50-1.50)"]
    assert rows[("c=1", "cpu ms/token: total")] == ["1.00", "0.90", "0.90x (0.50-1.50)"]
    assert rows[("c=1", "cpu ms/token: router")] == ["0.10", "0.10", ""]
    assert rows[("c=1", "TPOT mean ms")] == ["n/a", "n/a", "n/a"]


def test_a_round_without_a_server_adds_no_ratio(capsys):
    rounds = [{"vllm": figures(100, 10), "single": figures(200, 5)},
              {"single": figures(1000, 1)}]  # vLLM failed to start in this round
    rows = table_rows(rounds, capsys)
    assert rows[("c=1", "output tok/s")] == ["100.00", "600.00", "2.00x"]
    assert rows[("c=1", "TTFT mean ms")] == ["10.00", "3.00", "0.50x"]
