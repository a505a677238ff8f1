"""Compiles protos/*.proto into a descriptor set shipped inside the package.

Coalesce loads its messages into a private descriptor pool (see proxy/wire.py) so
that they never clash with the `inference.*` messages that tritonclient registers
in protobuf's default pool; a descriptor set is all that needs to be generated.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def compile_protos() -> None:
    from grpc_tools import protoc

    include = ROOT / "protos"
    sources = sorted(str(p) for p in include.glob("*.proto"))
    out = ROOT / "proxy" / "codecs" / "_protos.binpb"
    # grpc_tools ships the well-known types (google/protobuf/any.proto, wrappers.proto)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{include}",
        f"-I{well_known}",
        f"--descriptor_set_out={out}",
        "--include_imports",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {sources}")


class BuildWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
