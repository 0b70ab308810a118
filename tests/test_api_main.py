"""``cleave serve``'s one command line for the server and engine configs."""

from __future__ import annotations

import pytest

from cleave.router.main import DEFAULT_MODEL, parse_configs, resolve_model


def test_defaults(monkeypatch):
    for key in ("CLEAVE_MODEL", "CLEAVE_HOST", "CLEAVE_PORT", "CLEAVE_GRPC_PORT", "CLEAVE_SERVED_MODEL_NAME",
                "CLEAVE_BLOCK_SIZE"):
        monkeypatch.delenv(key, raising=False)
    server, engine = parse_configs([])
    assert (server.host, server.port, server.grpc_port) == ("127.0.0.1", 8000, 50051)
    assert server.model == engine.model == DEFAULT_MODEL
    assert server.served_model_name == DEFAULT_MODEL


def test_flags_then_environment(monkeypatch):
    monkeypatch.setenv("CLEAVE_PORT", "9001")
    monkeypatch.setenv("CLEAVE_BLOCK_SIZE", "32")
    monkeypatch.setenv("CLEAVE_SERVED_MODEL_NAME", "from-env")
    server, engine = parse_configs(["--model", "tiny-llama", "--host", "0.0.0.0", "--max-num-seqs", "4",
                                    "--served-model-name", "from-flag"])
    assert (server.host, server.port, server.model, server.served_model_name) == ("0.0.0.0", 9001, "tiny-llama", "from-flag")
    assert (engine.model, engine.block_size, engine.max_num_seqs) == ("tiny-llama", 32, 4)


def test_grpc_port_zero_picks_a_free_one_and_minus_one_turns_grpc_off(monkeypatch):
    monkeypatch.setenv("CLEAVE_GRPC_PORT", "0")
    assert parse_configs([])[0].grpc_port == 0
    assert parse_configs(["--grpc-port", "-1"])[0].grpc_port == -1


@pytest.mark.parametrize(
    "argv",
    [["--port", "70000"], ["--block-size", "3"], ["--port", "eighty"], ["--grpc-port", "-2"],
     ["--grpc-port", "65536"], ["--port", "9000", "--grpc-port", "9000"]],
)
def test_bad_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_configs(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_resolve_model_takes_folders_as_they_are(tiny_models):
    assert resolve_model(str(tiny_models["llama"])) == tiny_models["llama"].resolve()
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("no-such-model")
