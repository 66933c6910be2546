"""llama.cpp's own tokenizer, built offline from the pinned llama-cpp-python sdist, as a reference for tokexp's GGUF adapter.

    python scripts/llamacpp_ref.py build [--force] [--jobs 2]
    python scripts/llamacpp_ref.py tokenize VOCAB "text" ["text" ...] [--add-special] [--parse-special]

VOCAB is a `.gguf` path or a GGUF zoo name (`llama-2`, `bert-bge`, ...). The sdist is the one pinned by the
`llama-cpp-vocab` asset (same version, same sha256), downloaded with tokexp's own downloader and checked against the pin.
Only `libllama` + ggml's CPU backend (static, Release, no CUDA/Metal/BLAS/OpenMP/curl, no examples/tests/server) and
the small CLI in `scripts/llamacpp/` are compiled. The result lives in `<cache_dir>/llamacpp/<sdist sha256>/`; it is
built in a temporary sibling folder and renamed into place only when complete, so an interrupted build is never reused.
"""
from __future__ import annotations

import argparse, contextlib, hashlib, json, os, platform, shutil, subprocess, sys, tarfile, tempfile, time
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
CLI_SRC = ROOT/"scripts"/"llamacpp"
EXE = "tokexp-llama-tokenize"
# parts of the sdist's vendor/llama.cpp that libllama + ggml-cpu need (CMake files, sources, headers, licences)
KEEP = ("CMakeLists.txt", "LICENSE", "cmake/", "ggml/", "src/", "include/", "vendor/", "licenses/")
CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release", "BUILD_SHARED_LIBS": "OFF",
    "GGML_CPU": "ON", "GGML_NATIVE": "OFF", "GGML_OPENMP": "OFF", "GGML_CUDA": "OFF", "GGML_METAL": "OFF",
    "GGML_BLAS": "OFF", "GGML_VULKAN": "OFF", "GGML_HIP": "OFF", "GGML_SYCL": "OFF", "GGML_OPENCL": "OFF",
    "GGML_BACKEND_DL": "OFF", "GGML_BUILD_TESTS": "OFF", "GGML_BUILD_EXAMPLES": "OFF",
    "LLAMA_CURL": "OFF", "LLAMA_OPENSSL": "OFF", "LLAMA_BUILD_COMMON": "OFF", "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_TOOLS": "OFF", "LLAMA_BUILD_EXAMPLES": "OFF", "LLAMA_BUILD_SERVER": "OFF", "LLAMA_BUILD_APP": "OFF",
    "LLAMA_BUILD_UI": "OFF",
}


class ToolMissingError(RuntimeError):
    "cmake or a C/C++ compiler is not installed: the reference cannot be built on this machine."


class BuildError(RuntimeError):
    "The llama.cpp build or the tokenizer CLI failed."


def _sdist_source():
    "The pinned llama-cpp-python sdist (`Source`) of the `llama-cpp-vocab` asset."
    from tokexp.assets import ASSETS
    src = next((s for s in ASSETS["llama-cpp-vocab"].sources if s.client == "pip-sdist" and s.package == "llama-cpp-python"), None)
    if src is None: raise BuildError("asset 'llama-cpp-vocab' no longer pins a llama-cpp-python sdist; update scripts/llamacpp_ref.py")
    return src


def cache_root(cache_dir: str|Path|None = None) -> Path:
    "Folder of the llama.cpp builds: `<cache_dir>/llamacpp`."
    from tokexp.core import load_settings
    return Path(cache_dir or load_settings().path_for("cache_dir"))/"llamacpp"


def build_dir(cache_dir: str|Path|None = None) -> Path:
    "Folder of the finished build for the pinned sdist: `<cache_dir>/llamacpp/<sdist sha256>`."
    return cache_root(cache_dir)/_sdist_source().sha256


def _cli_hash() -> str:
    "sha256 over our CLI sources: a finished build made from other sources is rebuilt."
    h = hashlib.sha256()
    for p in sorted(CLI_SRC.iterdir()):
        if p.is_file(): h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def find_tools() -> dict:
    "cmake and C/C++ compilers on PATH (honouring $CC/$CXX); raises `ToolMissingError` saying what to install."
    cmake = shutil.which("cmake")
    cxx = shutil.which(os.environ.get("CXX", "")) if os.environ.get("CXX") else next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)
    cc = shutil.which(os.environ.get("CC", "")) if os.environ.get("CC") else next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    missing = [n for n, p in (("cmake (>= 3.14)", cmake), ("a C++17 compiler (g++ or clang++, or set $CXX)", cxx),
                              ("a C compiler (gcc or clang, or set $CC)", cc)) if p is None]
    if missing:
        raise ToolMissingError("cannot build llama.cpp's reference tokenizer: missing " + ", ".join(missing) +
                               ". Install them (Debian/Ubuntu: apt-get install cmake g++) and retry.")
    return {"cmake": cmake, "cxx": cxx, "cc": cc}


@contextlib.contextmanager
def _lock(path: Path):
    "An exclusive advisory lock on `path` (serialises builds by concurrent processes)."
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX)
        try: yield
        finally: fcntl.flock(f, fcntl.LOCK_UN)


def sdist_path(cache_dir: str|Path|None = None) -> Path:
    "The pinned sdist, downloaded once into `<cache_dir>/llamacpp/sdist/` with tokexp's downloader and sha256-checked."
    from tokexp.assets import download_source, verify_archive
    src = _sdist_source()
    d = cache_root(cache_dir)/"sdist"
    final = d/f"{src.package.replace('-', '_')}-{src.version}.tar.gz"
    if final.is_file():
        verify_archive(final, src, "llama-cpp-vocab")  # raises IntegrityError on a corrupt/replaced file
        return final
    with tempfile.TemporaryDirectory(prefix=".sdist-", dir=_mkdir(d)) as tmp:
        arch = download_source(src, Path(tmp)/"dl")
        verify_archive(arch, src, "llama-cpp-vocab")
        os.replace(arch, final)
    return final


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True); return p


def _extract_llamacpp(archive: Path, dest: Path) -> Path:
    "Extract the parts of `vendor/llama.cpp` that the build needs (see `KEEP`) into `dest`; returns the source root."
    n = 0
    with tarfile.open(archive) as tf:
        for m in tf:
            parts = PurePosixPath(m.name).parts
            if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or ".." in parts or not m.isfile(): continue
            rel = "/".join(parts[3:])
            if not any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in KEEP): continue
            out = dest/rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with tf.extractfile(m) as fsrc, open(out, "wb") as f: shutil.copyfileobj(fsrc, f, 1 << 20)
            n += 1
    if not (dest/"include"/"llama.h").is_file():
        raise BuildError(f"{archive.name} holds no vendor/llama.cpp/include/llama.h ({n} files extracted); is it the llama-cpp-python sdist?")
    return dest


def _run(cmd: list[str], log: Path, what: str, cwd: Path|None = None):
    "Run a build step, appending its output to `log`; a failure raises `BuildError` with the log's tail."
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n"); f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise BuildError(f"{what} failed (exit {r.returncode}); full log: {log}\n{tail}")


def is_built(cache_dir: str|Path|None = None) -> bool:
    "Is a finished build of the pinned sdist with the current CLI sources in the cache?"
    d = build_dir(cache_dir)
    try: info = json.loads((d/"BUILD.json").read_text())
    except (OSError, ValueError): return False
    return (d/"bin"/EXE).is_file() and info.get("cli_sha256") == _cli_hash()


def build(force: bool = False,  # rebuild even if a finished build is cached
          jobs: int = 2,  # parallel compile jobs (the shared machine has 2 cores)
          cache_dir: str|Path|None = None,  # cache folder; default from settings.ini
          verbose: bool = True,  # print progress to stderr
          ) -> Path:
    "Build (or reuse) llama.cpp's tokenizer CLI for the pinned sdist; returns the path of the executable."
    d = build_dir(cache_dir)
    if not force and is_built(cache_dir): return d/"bin"/EXE
    tools = find_tools()
    root = _mkdir(cache_root(cache_dir))
    with _lock(root/".build.lock"):
        if not force and is_built(cache_dir): return d/"bin"/EXE  # another process finished it while we waited
        for stale in root.glob(f".{d.name}.tmp-*"): shutil.rmtree(stale, ignore_errors=True)
        tmp = root/f".{d.name}.tmp-{os.getpid()}-{time.time_ns()}"
        try:
            (tmp/"bin").mkdir(parents=True)
            log = tmp/"build.log"
            cli_sha = _cli_hash()  # hashed before compiling: an edit during the build makes the result stale, not wrong
            t0 = time.perf_counter()
            archive = sdist_path(cache_dir)
            src = _extract_llamacpp(archive, tmp/"src")
            t_extract = time.perf_counter() - t0
            if verbose: print(f"llama.cpp sources extracted in {t_extract:.1f}s; building with -j{jobs} (log: {log})", file=sys.stderr)
            cfg = [tools["cmake"], "-S", str(CLI_SRC), "-B", str(tmp/"build"), f"-DLLAMA_CPP_DIR={src}",
                   f"-DCMAKE_C_COMPILER={tools['cc']}", f"-DCMAKE_CXX_COMPILER={tools['cxx']}",
                   *(f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items())]
            t1 = time.perf_counter()
            _run(cfg, log, "cmake configure")
            t2 = time.perf_counter()
            _run([tools["cmake"], "--build", str(tmp/"build"), "--target", EXE, "-j", str(jobs)], log, "cmake build")
            t3 = time.perf_counter()
            shutil.copy2(tmp/"build"/EXE, tmp/"bin"/EXE)
            cxx_version = subprocess.run([tools["cxx"], "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
            s = _sdist_source()
            info = {"sdist": f"{s.package}=={s.version}", "sdist_sha256": s.sha256, "cli_sha256": cli_sha,
                    "cmake_options": CMAKE_OPTIONS, "jobs": jobs, "compiler": cxx_version[0] if cxx_version else tools["cxx"],
                    "machine": platform.machine(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "seconds": {"extract": round(t_extract, 1), "configure": round(t2 - t1, 1), "compile": round(t3 - t2, 1),
                                "total": round(t3 - t0, 1)}}
            (tmp/"BUILD.json").write_text(json.dumps(info, indent=1) + "\n")
            shutil.rmtree(tmp/"build"); shutil.rmtree(tmp/"src")  # keep the executable (static) and the log only
            old = root/f".{d.name}.tmp-old-{os.getpid()}-{time.time_ns()}"
            if d.exists(): os.replace(d, old)
            os.replace(tmp, d)
            shutil.rmtree(old, ignore_errors=True)
            if verbose: print(f"built {d/'bin'/EXE} in {info['seconds']['total']:.0f}s "
                              f"(configure {info['seconds']['configure']:.0f}s, compile {info['seconds']['compile']:.0f}s)", file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return d/"bin"/EXE


def build_info(cache_dir: str|Path|None = None) -> dict:
    "BUILD.json of the finished build (versions, options, build seconds)."
    return json.loads((build_dir(cache_dir)/"BUILD.json").read_text())


def resolve_vocab(vocab: str|Path) -> Path:
    "A `.gguf` path, or the file of a GGUF zoo entry (`llama-2`, `bert-bge`, ...)."
    p = Path(vocab)
    if p.is_file(): return p
    from tokexp import tokenizers as T, assets
    e = T.ZOO.get(str(vocab))
    if e is not None and e.format == "gguf": return assets.asset_file(e.asset, e.path)
    gg = sorted(n for n, z in T.ZOO.items() if z.format == "gguf")
    raise FileNotFoundError(f"{vocab!r} is neither a .gguf file nor a GGUF zoo name (one of: {', '.join(gg)})")


def tokenize(vocab_path: str|Path,  # a ggml-vocab-*.gguf (or any GGUF) or a GGUF zoo name
             texts: list[str]|str,  # the texts; one CLI call for all of them
             add_special: bool|list[bool] = False,  # llama_tokenize's add_special (BOS/EOS/CLS/SEP), or one per text; test-tokenizer-0 uses false
             parse_special: bool = False,  # match control-token text inside the input; test-tokenizer-0 uses false
             timeout: float = 600,  # seconds
             cache_dir: str|Path|None = None,
             ) -> list[list[int]]:
    "Token ids of every text according to llama.cpp itself (builds the reference on first use)."
    if isinstance(texts, str): texts = [texts]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad: raise TypeError(f"texts must be strings; entries {bad[:5]} are not")
    if isinstance(add_special, bool): add_special = [add_special] * len(texts)
    add_special = [bool(a) for a in add_special]
    if len(add_special) != len(texts): raise ValueError(f"add_special has {len(add_special)} entries for {len(texts)} texts; pass one bool or one per text")
    exe = build(cache_dir=cache_dir, verbose=True)
    path = resolve_vocab(vocab_path)
    req = json.dumps({"texts": list(texts), "add_special": add_special, "parse_special": bool(parse_special)})
    try:
        r = subprocess.run([str(exe), str(path)], input=req.encode("utf-8"), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{EXE} did not finish {len(texts)} texts of {path.name} within {timeout}s") from None
    err = r.stderr.decode("utf-8", errors="replace")
    if r.returncode != 0: raise BuildError(f"{EXE} failed on {path} (exit {r.returncode}):\n{err[-3000:]}")
    out = json.loads(r.stdout)["ids"]
    if len(out) != len(texts): raise BuildError(f"{EXE} returned {len(out)} results for {len(texts)} texts")
    return out


def main(argv: list[str]|None = None) -> int:
    "Command line: build / tokenize / info."
    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser(prog="python scripts/llamacpp_ref.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pb = sub.add_parser("build", help="build (or reuse) the reference tokenizer")
    pb.add_argument("--force", action="store_true", help="rebuild even if cached")
    pb.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    sub.add_parser("info", help="print BUILD.json of the cached build")
    pt = sub.add_parser("tokenize", help="print llama.cpp's token ids of each TEXT")
    pt.add_argument("vocab", help=".gguf path or GGUF zoo name")
    pt.add_argument("texts", nargs="+", help="texts ('-' reads stdin)")
    pt.add_argument("--add-special", action="store_true", help="add BOS/EOS/CLS/SEP as the vocabulary asks")
    pt.add_argument("--parse-special", action="store_true", help="match control-token text inside the input")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            print(build(force=a.force, jobs=a.jobs)); return 0
        if a.cmd == "info":
            if not is_built(): print(f"no finished build in {build_dir()}; run: python scripts/llamacpp_ref.py build", file=sys.stderr); return 1
            print(json.dumps(build_info(), indent=1)); return 0
        texts = [sys.stdin.read() if t == "-" else t for t in a.texts]
        for ids in tokenize(a.vocab, texts, add_special=a.add_special, parse_special=a.parse_special):
            print(" ".join(map(str, ids)))
        return 0
    except (ToolMissingError, BuildError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr); return 2


if __name__ == "__main__":
    sys.exit(main())
