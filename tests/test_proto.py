"""The gRPC contracts: stubs import, every message and rpc is documented, names follow
vLLM's XxxRequest/XxxResponse, SamplingParams mirrors the engine's, and gen_proto.sh
regenerates only when a proto changed."""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("common", "generate", "prefill", "decode", "kvstore", "expert")
SERVICES = {"generate": "Generate", "prefill": "Prefill", "decode": "Decode", "kvstore": "KVStore", "expert": "Expert"}


def pb2(name: str):
    return importlib.import_module(f"cleave.protogen.cleave.v1.{name}_pb2")


@pytest.mark.parametrize("name", MODULES)
def test_stubs_import_with_their_package(name):
    module = pb2(name)
    grpc_module = importlib.import_module(f"cleave.protogen.cleave.v1.{name}_pb2_grpc")
    assert module.DESCRIPTOR.package == "cleave.v1"
    assert module.DESCRIPTOR.name == f"cleave/v1/{name}.proto"
    if name in SERVICES:
        service = SERVICES[name]
        assert hasattr(grpc_module, f"{service}Stub") and hasattr(grpc_module, f"add_{service}Servicer_to_server")


@pytest.mark.parametrize("name", SERVICES)
def test_rpcs_take_a_request_and_return_a_response_named_after_them(name):
    service = pb2(name).DESCRIPTOR.services_by_name[SERVICES[name]]
    assert service.full_name == f"cleave.v1.{SERVICES[name]}"
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("descriptors") / "set.pb"
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--descriptor_set_out={out}", "--include_source_info", *protos])
    assert rc == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_every_message_enum_service_and_rpc_has_a_doc_comment(descriptor_set):
    # Source-info paths: 4 = message_type, 3 = nested_type, 5 = enum_type, 6 = service, 2 = method.
    undocumented = []
    for file in descriptor_set.file:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}

        def check(path, name):
            if not comments.get(tuple(path)):
                undocumented.append(f"{file.name}: {name}")

        def messages(items, prefix, path):
            for i, message in enumerate(items):
                if message.options.map_entry:  # synthesized for a map<> field
                    continue
                check([*path, i], prefix + message.name)
                messages(message.nested_type, prefix + message.name + ".", [*path, i, 3])

        messages(file.message_type, "", [4])
        for i, enum in enumerate(file.enum_type):
            check([5, i], enum.name)
        for i, service in enumerate(file.service):
            check([6, i], service.name)
            for j, method in enumerate(service.method):
                check([6, i, 2, j], f"{service.name}.{method.name}")
    assert undocumented == []
    assert {f.name for f in descriptor_set.file} == {f"cleave/v1/{m}.proto" for m in MODULES}


def test_sampling_params_mirror_the_engine_dataclass():
    from cleave.engine.sampling_params import SamplingParams

    message = pb2("common").SamplingParams.DESCRIPTOR
    engine_fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    assert set(message.fields_by_name) == set(engine_fields)
    engine_defaults = SamplingParams()
    for field in message.fields:
        default = getattr(engine_defaults, field.name)
        zero = [] if field.is_repeated else (None if field.name == "seed" else type(default)())
        # A field whose engine default differs from proto3's zero value must be optional,
        # or "unset" could not be told from that zero.
        if default != zero:
            assert field.has_presence, f"SamplingParams.{field.name} must be optional"


def test_messages_round_trip_and_oneof_input_is_exclusive():
    generate, common = pb2("generate"), pb2("common")
    request = generate.GenerateRequest(
        request_id="r1", model="tiny", prompt="hello", params=common.SamplingParams(temperature=0.0, seed=3),
        stop=["\n"],
    )
    request.prompt_token_ids.ids.extend([1, 2, 3])  # replaces the prompt text
    back = generate.GenerateRequest.FromString(request.SerializeToString())
    assert back.WhichOneof("input") == "prompt_token_ids" and list(back.prompt_token_ids.ids) == [1, 2, 3]
    assert back.params.HasField("temperature") and back.params.temperature == 0.0
    assert not back.params.HasField("max_tokens")
    decode = pb2("decode").DecodeRequest(request_id="r", token_ids=[5, 6], block_hashes=[2**63 - 1], num_generated=1)
    assert pb2("decode").DecodeRequest.FromString(decode.SerializeToString()).block_hashes == [2**63 - 1]
    chunk = pb2("kvstore").KVBlockChunk(data=b"x")
    assert not chunk.HasField("block_hash")
    chunk.block_hash = 0
    assert chunk.HasField("block_hash")  # hash 0 is a hash, not "missing"


def _copy_layout(dest: Path) -> Path:
    shutil.copytree(ROOT / "proto", dest / "proto")
    (dest / "infra" / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "infra" / "scripts" / "gen_proto.sh", dest / "infra" / "scripts" / "gen_proto.sh")
    (dest / "services" / "cleave").mkdir(parents=True)
    return dest / "infra" / "scripts" / "gen_proto.sh"


def test_gen_proto_is_idempotent_and_regenerates_on_change(tmp_path):
    script = _copy_layout(tmp_path)
    env = {**os.environ, "PYTHON": sys.executable}
    out = tmp_path / "services" / "cleave" / "protogen"

    first = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "generated" in first.stderr
    kvstore_py = out / "cleave" / "v1" / "kvstore_pb2_grpc.py"
    assert "from cleave.protogen.cleave.v1 import kvstore_pb2" in kvstore_py.read_text()
    assert all((d / "__init__.py").is_file() for d in (out, out / "cleave", out / "cleave" / "v1"))
    stamp = (out / ".stamp").read_text()
    mtime = kvstore_py.stat().st_mtime_ns

    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr == ""
    assert kvstore_py.stat().st_mtime_ns == mtime

    common = tmp_path / "proto" / "cleave" / "v1" / "common.proto"
    common.write_text(common.read_text() + "\n// A new message.\nmessage Extra {}\n")
    changed = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 0 and "generated" in changed.stderr
    assert (out / ".stamp").read_text() != stamp
    assert "Extra" in (out / "cleave" / "v1" / "common_pb2.pyi").read_text()
    assert not list((tmp_path / "services" / "cleave").glob("protogen.tmp.*"))


def test_gen_proto_fails_clearly_on_a_broken_proto(tmp_path):
    script = _copy_layout(tmp_path)
    (tmp_path / "proto" / "cleave" / "v1" / "broken.proto").write_text('syntax = "proto3";\nmessage {')
    result = subprocess.run(
        ["bash", str(script)], env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "broken.proto" in result.stderr
    assert not (tmp_path / "services" / "cleave" / "protogen").exists()
    assert not list((tmp_path / "services" / "cleave").glob("protogen.tmp.*"))
