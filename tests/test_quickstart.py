"""The README's first steps on the default model: `cleave up` (what `make up` runs),
then the official `openai` client streams a chat completion from SmolLM2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import openai


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_up_then_openai_streams_chat_from_smollm2(smollm2_dir, tmp_path):
    env = {**os.environ, "CLEAVE_HOME": str(tmp_path / "home")}
    port = _free_port()

    def cleave(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cleave.cli", *args], env=env, capture_output=True, text=True,
                              timeout=240)

    try:
        up = cleave("up", "--model", str(smollm2_dir), "--served-model-name", "smollm2-135m-instruct",
                    "--port", str(port), "--timeout", "180")
        assert up.returncode == 0, up.stderr
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        stream = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in text, text
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        down = cleave("down")
    assert down.returncode == 0, down.stderr
