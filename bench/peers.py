"""Peer benchmark (issue 9): tandem vs llama.cpp vs transformers + accelerate, same model files, same machine, one run.

STATUS: the H200 run is PENDING. The session that wrote this had no device time; `--dry-run` and `--cpu-only`
(tiny models, the llama.cpp built here, no GPU) ran on the 2-core EPYC: bench/results/llamacpp-parity-epyc.md.

What it runs, per model (default: Qwen3-30B-A3B and DeepSeek-V2-Lite at full depth, random weights):
  file   `tandem synth PRESET --gguf --quant Q4_K_M-like` (llama-quantize's Q4_K_M type choices, llama.cpp's layout)
  tandem the GGUF with rules "1gpu": routed experts on the C++ CPU kernel from the file's own blocks, the rest on
         cuda:0; prefill = one prompt of P tokens through the model, decode = the engine at batch 1
  llama  llama-bench on the same GGUF: -ngl 99 -ot exps=CPU (the same split) -t THREADS, -p 512,2048,8192 at
         -ub 512 and 2048 (the better one is reported), -n 64 for decode; built here from the llama-cpp-python
         source package (its vendored llama.cpp) with CUDA for sm_90 and native CPU flags, cached in --work
  hf     transformers + accelerate: `tandem synth PRESET --dtype bfloat16` safetensors at the same shapes,
         device_map="auto" with max_memory giving cuda:0 the VRAM tandem used (nvidia-smi peak; for a model cut to
         L of N layers, L/N of it) and the rest to CPU RAM; as deep as the disk holds or --hf-layers (a 64 GiB disk
         does not hold Qwen3-30B-A3B in bf16 beside the rest): the table gives the measured depth and the rate
         scaled to full depth (offloaded layers cost the same each)
  agree  greedy ids for 16 steps from tandem and from llama.cpp (bench/llamacpp_greedy.cpp, same split) on the GGUF:
         equal, or the first position where they part with both engines' top-2 logit margins there
Peak VRAM: nvidia-smi's memory.used polled during each engine's process, minus the idle reading before it.

Device calls last at most 10 minutes, and the CUDA build alone takes several: the run is resumable. Every finished
step is kept in WORK/state.json; each call does what is left until --deadline, then exits 3 ("run again"); the
call that finishes writes the report (exit 0). The llama.cpp source travels as a trimmed tarball (the sdist is
76.6 MB, over the 64 MiB a call carries):

  here:      python bench/peers.py pack /tmp/llamacpp/llama_cpp_python-0.3.36.tar.gz   # -> build/peers/ (5.1 MiB)
  on H200:   run(command="source scripts/device_env.sh; PYTHONUNBUFFERED=1 python3 bench/peers.py run
                 --deadline 540 --results $OUT", carry=[".whl", "build/peers"])   # repeat until rc 0
  preview:   python bench/peers.py run --dry-run
  CPU check: python bench/peers.py run --cpu-only --llama-build /tmp/llamacpp/build-cpu \\
                 --llama-src /tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / "build" / "peers" / "llama-src.tar.gz"
MODELS = "qwen3-30b-a3b,deepseek-v2-lite"
CPU_MODELS = "tiny-qwen3-moe,tiny-deepseek-v2"
PROMPT = [1, 77, 88, 99, 5, 6, 7, 300, 42, 17]  # ids of the greedy check (tokenizer-independent)
GREEDY_STEPS = 16
# the sdist minus what a CUDA build of llama-bench never reads (model vocab files, docs, tests, web UI, examples,
# the git objects of the submodule (38 MB), the backends other than CPU and CUDA)
DROP = ("vendor/llama.cpp/models/", "vendor/llama.cpp/docs/", "vendor/llama.cpp/media/", "vendor/llama.cpp/tests/",
        "vendor/llama.cpp/benches/", "vendor/llama.cpp/examples/", "vendor/llama.cpp/pocs/",
        "vendor/llama.cpp/tools/ui/", "vendor/llama.cpp/tools/server/", "vendor/llama.cpp/.github/",
        "vendor/llama.cpp/gguf-py/", "vendor/llama.cpp/skills/", "vendor/llama.cpp/ci/", "docs/", "tests/",
        "examples/", "docker/", "llama_cpp/", ".git/") + tuple(
    f"vendor/llama.cpp/ggml/src/ggml-{b}/" for b in ("vulkan", "sycl", "opencl", "metal", "hexagon", "cann", "webgpu",
                                                     "openvino", "et", "virtgpu", "zdnn", "zendnn", "blas"))
TARGETS = ["llama-bench", "llama"]


class Incomplete(Exception):
    """The deadline came before a step could finish or start: run the same command again."""


# ---------------------------------------------------------------------------------------- the source package


def pack(sdist: Path, out: Path = PACK) -> Path:
    """Trim the llama-cpp-python sdist to what the build needs; record the original's name and sha256."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = 0
    with tarfile.open(sdist) as src, tarfile.open(out, "w:gz", compresslevel=9) as dst:
        for m in src.getmembers():
            rel = m.name.split("/", 1)[1] if "/" in m.name else ""
            if any(rel.startswith(d) for d in DROP):
                continue
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
            kept += m.size
        head = next((m for m in src.getmembers() if m.name.endswith(".git/modules/vendor/llama.cpp/HEAD")), None)
        commit = src.extractfile(head).read().decode().strip() if head else None
    info = {"sdist": sdist.name, "sha256": digest, "llama_cpp_commit": commit, "dropped": DROP}
    out.with_suffix("").with_suffix(".json").write_text(json.dumps(info, indent=1))
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB ({kept / 2**20:.0f} MiB unpacked) from {sdist.name} "
          f"({sdist.stat().st_size / 2**20:.1f} MiB, sha256 {digest[:16]}...)")
    return out


def llama_commit(src: Path) -> str:
    """The llama.cpp commit the sdist vendors: the submodule's HEAD recorded by `pack`, else its changelog's
    "update llama.cpp to ggml-org/llama.cpp@..." line."""
    info = PACK.with_suffix("").with_suffix(".json")
    if info.exists() and json.loads(info.read_text()).get("llama_cpp_commit"):
        return json.loads(info.read_text())["llama_cpp_commit"]
    for p in (src.parent.parent / "CHANGELOG.md", src / "CHANGELOG.md"):
        if p.exists():
            m = re.search(r"ggml-org/llama\.cpp@([0-9a-f]{7,40})", p.read_text())
            if m:
                return m[1]
    return "unknown"


# ---------------------------------------------------------------------------------------- running things


class Runner:
    """Runs (or, dry, prints) commands under the deadline; keeps finished steps in state.json."""

    def __init__(self, work: Path, deadline: float, dry: bool):
        self.work, self.dry = work, dry
        self.end = time.monotonic() + deadline
        self.state_path = work / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def left(self) -> float:
        return self.end - time.monotonic()

    def step(self, key: str, need_s: float, fn):
        """fn() once: its result is kept; skipped when already done; Incomplete when less than need_s is left."""
        if key in self.state:
            return self.state[key]
        if self.dry:
            print(f"# step {key}")
            return fn()
        if self.left() < need_s:
            raise Incomplete(f"{key} needs ~{need_s:.0f} s, {self.left():.0f} s left")
        t0 = time.perf_counter()
        print(f"== {key} ({self.left():.0f} s left)", file=sys.stderr, flush=True)
        res = fn()
        if isinstance(res, dict):
            res.setdefault("seconds", round(time.perf_counter() - t0, 1))
        self.state[key] = res
        self.state_path.write_text(json.dumps(self.state, indent=1))
        return res

    def sh(self, cmd: list[str], timeout: float | None = None, env: dict | None = None, cwd: Path | None = None,
           gpu: bool = False) -> tuple[str, float]:
        """(stdout, peak GPU MiB above idle while it ran) of cmd; Incomplete if the deadline cuts it."""
        line = shlex.join(cmd)
        if self.dry:
            print(line)
            return "", 0.0
        self.state.setdefault("commands", []).append(line)
        poller = GpuPoller() if gpu else None
        # its own process group, so that a deadline stops the compilers a build started, not only the build
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            out, err = p.communicate(timeout=min(timeout or 1e9, max(self.left(), 1)))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise Incomplete(f"deadline during: {line}") from None
        finally:
            peak = poller.stop() if poller else 0.0
        if p.returncode != 0:
            raise RuntimeError(f"{line} failed ({p.returncode}):\n{err[-3000:]}")
        return out, peak


class GpuPoller:
    """Peak memory.used of GPU 0 (nvidia-smi, every 0.2 s) above its reading at the start, MiB."""

    def __init__(self):
        self.base = self.read()
        self.peak, self.done = self.base, threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    @staticmethod
    def read() -> float:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return 0.0

    def loop(self) -> None:
        while not self.done.wait(0.2):
            self.peak = max(self.peak, self.read())

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return max(self.peak - self.base, 0.0)


# ---------------------------------------------------------------------------------------- steps


def build_llama(r: Runner, args) -> dict:
    """Configure and build llama-bench and libllama (CUDA sm_90 + native CPU, or CPU only), then the greedy driver."""
    src = Path(args.llama_src) if args.llama_src else r.work / "src" / "vendor" / "llama.cpp"
    build = Path(args.llama_build) if args.llama_build else r.work / ("build-cpu" if args.cpu_only else "build-cuda")
    if not args.llama_src and not (src / "CMakeLists.txt").exists():
        if not PACK.exists() and not r.dry:
            raise ValueError(f"{PACK} is missing: run `python bench/peers.py pack SDIST` here and carry build/peers")
        r.sh(["mkdir", "-p", str(r.work / "src")])
        r.sh(["tar", "xzf", str(PACK), "-C", str(r.work / "src"), "--strip-components=1"])
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DBUILD_SHARED_LIBS=ON", f"-DLLAMA_BUILD_COMMIT={llama_commit(src)}", "-DLLAMA_BUILD_NUMBER=0"]
    if not args.cpu_only:
        flags += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90"]
    if not args.llama_build:
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        r.sh(["cmake", "-S", str(src), "-B", str(build), *gen, *flags])
        r.sh(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 4), "--target", *TARGETS])
    greedy = build / "bin" / "llamacpp_greedy"
    r.sh(["g++", "-O2", "-std=c++17", "-I", str(src / "include"), "-I", str(src / "ggml" / "include"),
          str(ROOT / "bench" / "llamacpp_greedy.cpp"), "-L", str(build / "bin"), "-lllama", "-lggml", "-lggml-base",
          f"-Wl,-rpath,{build / 'bin'}", "-o", str(greedy)])
    return {"src": str(src), "bin": str(build / "bin"), "cmake_flags": flags, "llama_cpp_commit": llama_commit(src)}


def export_build(bins: Path, out: Path, part_mib: int = 15) -> list[Path]:
    """The built binaries (llama-bench, the greedy driver, the shared libraries) as an xz tarball in parts of
    part_mib MiB under `out`: a device call returns files of at most 16 MiB, and a later call carries them back
    (unpack with `cat llama-bin.tar.xz.* | tar xJ -C BUILD/bin`, run with LD_LIBRARY_PATH=BUILD/bin)."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in bins.iterdir() if p.name in ("llama-bench", "llamacpp_greedy") or ".so" in p.name)
    blob = subprocess.run(["tar", "cf", "-", "-C", str(bins), *names], capture_output=True, check=True).stdout
    packed = subprocess.run(["xz", "-T0", "-6"], input=blob, capture_output=True, check=True).stdout
    step = part_mib << 20
    parts = []
    for i in range(0, len(packed), step):
        parts.append(out / f"llama-bin.tar.xz.{i // step:02d}")
        parts[-1].write_bytes(packed[i : i + step])
    print(f"{len(names)} files, {len(blob) / 2**20:.0f} MiB -> {len(packed) / 2**20:.1f} MiB in {len(parts)} parts "
          f"under {out}")
    return parts


def environment(args) -> dict:
    """Versions and machine, for the report."""
    import torch

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except OSError:
            return ""

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "tandem_commit": os.environ.get("TANDEM_COMMIT") or run(["git", "-C", str(ROOT), "rev-parse", "--short",
                                                                       "HEAD"]) or "unknown",  # env: an export
           "cpu": next((ln.split(":", 1)[1].strip() for ln in run(["lscpu"]).splitlines()
                        if ln.startswith("Model name")), platform.processor()),
           "cores": os.cpu_count(), "threads": args.threads}
    for mod in ("transformers", "accelerate"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = "not installed"
    if not args.cpu_only:
        env["gpu"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        env["nvcc"] = run(["nvcc", "--version"]).splitlines()[-1:] or ["?"]
    src_info = PACK.with_suffix("").with_suffix(".json")
    if src_info.exists():
        env["sdist"] = json.loads(src_info.read_text())
    return env


def _spec(m: str) -> tuple[str, list[str]]:
    """"deepseek-v3:4" -> ("deepseek-v3", ["--layers", "4"]): real per-layer shapes at a cut depth."""
    preset, _, layers = m.partition(":")
    return preset, (["--layers", layers] if layers else [])


def synth_gguf(r: Runner, m: str, path: Path, quant: str) -> dict:
    preset, layers = _spec(m)
    r.sh([sys.executable, "-m", "tandem", "synth", preset, "--gguf", "--quant", quant, *layers, "--out", str(path)])
    return {"path": str(path), "gb": round(path.stat().st_size / 1e9, 2) if path.exists() else None, "quant": quant}


def run_tandem(r: Runner, args, gguf: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_tandem", str(gguf), "--threads", str(args.threads),
           "--prefill", args.prefill, "--decode-tokens", str(args.decode_tokens)] + (
        ["--cpu"] if args.cpu_only else ["--profile"])
    out, peak = r.sh(cmd, gpu=not args.cpu_only)
    res = json.loads(out.strip().splitlines()[-1]) if out else {}
    res["peak_vram_mib_smi"] = round(peak)
    return res


def run_llama_bench(r: Runner, args, bins: Path, gguf: Path) -> dict:
    base = [str(bins / "llama-bench"), "-m", str(gguf), "-t", str(args.threads), "-r", str(args.reps), "-o", "json"]
    split = [] if args.cpu_only else ["-ngl", "99", "-ot", "exps=CPU", "-fa", "1"]
    pre, peak_p = r.sh(base + split + ["-p", args.prefill, "-n", "0", "-b", str(max(_ints(args.prefill))),
                                       "-ub", args.ubatch], gpu=not args.cpu_only)
    dec, peak_d = r.sh(base + split + ["-p", "0", "-n", str(args.decode_tokens)], gpu=not args.cpu_only)
    res = {"prefill": {}, "runs": []}
    for test in (json.loads(pre) if pre else []) + (json.loads(dec) if dec else []):
        res["runs"].append({k: test.get(k) for k in ("n_prompt", "n_gen", "n_ubatch", "avg_ts", "stddev_ts")})
        if test["n_prompt"] and not test["n_gen"]:
            key = str(test["n_prompt"])
            if test["avg_ts"] > res["prefill"].get(key, {}).get("tok_s", 0):
                res["prefill"][key] = {"tok_s": round(test["avg_ts"], 1), "ubatch": test["n_ubatch"]}
        elif test["n_gen"]:
            res["decode_b1"] = round(test["avg_ts"], 2)
        res.setdefault("build", test.get("build_commit"))
    res["peak_vram_mib_smi"] = round(max(peak_p, peak_d))
    return res


def run_greedy(r: Runner, args, bins: Path, gguf: Path, tandem_ids: list[int] | None) -> dict:
    cmd = [str(bins / "llamacpp_greedy"), str(gguf), str(GREEDY_STEPS), "0" if args.cpu_only else "99",
           str(args.threads), ",".join(map(str, PROMPT))] + ([] if args.cpu_only else ["exps"])
    out, _ = r.sh(cmd, gpu=not args.cpu_only)
    if not out:
        return {}
    lines = dict(ln.split(":", 1) for ln in out.strip().splitlines() if ":" in ln)
    ids = [int(x) for x in lines["ids"].split()]
    margins = [float(x) for x in lines["margins"].split()]
    first = next((i for i, (a, b) in enumerate(zip(tandem_ids or [], ids)) if a != b), None)
    return {"llama_ids": ids, "llama_margins": margins, "tandem_ids": tandem_ids, "first_difference": first}


def run_hf(r: Runner, args, m: str, vram_mib: float) -> dict:
    """Synthesize bf16 safetensors as deep as the disk allows, run transformers + accelerate, delete them."""
    from tandem.synth import preset_config

    preset, layers = _spec(m)
    full = preset_config(preset, int(layers[1]) if layers else None)["num_hidden_layers"]
    layers = args.hf_layers or _fit_layers(preset, r.work, full)
    out = r.work / f"{preset}-hf-{layers}"
    r.sh([sys.executable, "-m", "tandem", "synth", preset, "--out", str(out), "--layers", str(layers),
          "--dtype", "bfloat16"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "_hf", str(out), "--prefill", args.prefill,
           "--decode-tokens", str(args.hf_decode_tokens), "--threads", str(args.threads)]
    gpu_mib = max(int(vram_mib * layers / full), 1024)  # the cut model gets the same share of tandem's VRAM
    if not args.cpu_only:
        cmd += ["--gpu-mib", str(gpu_mib)]
    try:
        res_out, peak = r.sh(cmd, gpu=not args.cpu_only)
    finally:
        if not r.dry and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    res = json.loads(res_out.strip().splitlines()[-1]) if res_out else {}
    res.update(layers=layers, full_layers=full, peak_vram_mib_smi=round(peak), gpu_budget_mib=gpu_mib)
    return res


def _fit_layers(preset: str, work: Path, full: int) -> int:
    """The depth whose bf16 safetensors fit the free disk (8 GB kept free), at most the full depth."""
    from tandem.synth import preset_config
    from tandem.synth_gguf import gguf_tensors

    def gb(n):
        return sum(s.nbytes for s in gguf_tensors(preset_config(preset, n), "BF16")) / 1e9

    one, two = gb(1), gb(2)
    free = shutil.disk_usage(work).free / 1e9 - 8
    per_layer, base = two - one, 2 * one - two
    return max(1, min(full, int((free - base) / per_layer)))


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


# ---------------------------------------------------------------------------------------- engine processes


def child_tandem(argv: list[str]) -> None:
    """One process: load the GGUF with tandem, time prefill and decode, greedy ids; one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--prefill", default="512,2048,8192")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--profile", action="store_true", help="a torch profiler table of decode steps (bench/e2e.py's)")
    a = ap.parse_args(argv)
    import torch

    import tandem
    from tandem.engine import SamplingParams, Sequence
    from tandem.kernels import cpu as K
    from tandem.models.attention import Batch

    K.set_num_threads(a.threads)
    cuda = not a.cpu and torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    llm = tandem.load(a.gguf, rules=None if a.cpu else "1gpu", dtype="float32" if a.cpu else "bfloat16",
                      progress=False)
    res = {"load_s": round(time.perf_counter() - t0, 1), "rules": "cpu (default)" if a.cpu else "1gpu",
           "kernel_threads": K.num_threads(), "prefill": {}}
    greedy = llm.generate(PROMPT, max_new_tokens=GREEDY_STEPS, ignore_eos=True)
    res["greedy_ids"] = greedy.token_ids
    vocab = llm.model.args.vocab_size
    for p in _ints(a.prefill):  # each length twice, the second timed (llama-bench also warms up first)
        for timed in (False, True):
            ids = torch.randint(0, vocab, (p,))
            batch = Batch.single(p)
            with torch.inference_mode():
                sync()
                t = time.perf_counter()
                llm.model(ids, batch.positions(), batch)
                sync()
            key = "tok_s" if timed else "first_call_tok_s"
            res["prefill"].setdefault(str(p), {})[key] = round(p / (time.perf_counter() - t), 1)
    engine = llm.engine
    seq = engine.add(Sequence(PROMPT, SamplingParams(max_new_tokens=a.decode_tokens, ignore_eos=True)))
    start = done = None
    with torch.inference_mode():
        while engine.has_work():
            engine.step()
            if start is None and len(seq.output) >= 2:  # prefill and the first (graph-capturing) step done
                sync()
                start, done = time.perf_counter(), len(seq.output)
    sync()
    res["decode_b1"] = round((len(seq.output) - done) / (time.perf_counter() - start), 2)
    if cuda:
        res["torch_peak_vram_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if a.profile:  # where a decode step's time goes, for the note when a target is missed
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from e2e import profile_decode

        res["profile"] = profile_decode(llm)
    print(json.dumps(res))


def child_hf(argv: list[str]) -> None:
    """One process: transformers (+ accelerate's device_map offload when a GPU budget is given); one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prefill", default="512,2048,8192")
    ap.add_argument("--decode-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--gpu-mib", type=int, default=None)
    a = ap.parse_args(argv)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    kw = {"dtype": torch.bfloat16}
    if a.gpu_mib:  # the GPU gets what tandem used; accelerate offloads the rest to CPU RAM
        kw.update(device_map="auto", max_memory={0: f"{a.gpu_mib}MiB", "cpu": "200GiB"})
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, **kw).eval()
    res = {"load_s": round(time.perf_counter() - t0, 1), "transformers": transformers.__version__, "prefill": {},
           "device_map": {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {"": "cpu"}).items()}}
    on_gpu = a.gpu_mib is not None
    dev = "cuda:0" if on_gpu else "cpu"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    vocab = model.config.vocab_size
    for p in _ints(a.prefill):
        ids = torch.randint(0, vocab, (1, p), device=dev)
        with torch.inference_mode():
            sync()
            t = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            sync()
        res["prefill"][str(p)] = {"tok_s": round(p / (time.perf_counter() - t), 2)}
    ids = torch.tensor([PROMPT], device=dev)
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        t = time.perf_counter()
        for _ in range(a.decode_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
    res["decode_b1"] = round(a.decode_tokens / (time.perf_counter() - t), 3)
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------- report


def report(state: dict, args, models: list[str]) -> str:
    env = state.get("env", {})
    b = state.get("build", {})
    when = datetime.date.today().isoformat()
    lines = [f"# Peers: tandem vs llama.cpp vs transformers + accelerate ({when})", "",
             f"Machine: {env.get('gpu', 'no GPU (--cpu-only)')}; CPU {env.get('cpu')} ({env.get('cores')} "
             f"logical cores, {env.get('threads')} threads for every engine).",
             f"Versions: tandem {env.get('tandem_commit')}, torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}, accelerate {env.get('accelerate')}, llama.cpp {b.get('llama_cpp_commit')} "
             f"(vendored in {env.get('sdist', {}).get('sdist', 'llama-cpp-python')}, sha256 "
             f"{env.get('sdist', {}).get('sha256', '?')[:16]}...), nvcc {env.get('nvcc')}.",
             f"llama.cpp build: cmake {' '.join(b.get('cmake_flags', []))}", "",
             "Rates in tok/s; ratio = tandem / peer. Prefill: one prompt of P tokens (no logits but the last); "
             "decode: batch 1. VRAM: nvidia-smi peak above idle during the engine's process.", "",
             "| model | engine | " + " | ".join(f"prefill {p}" for p in _ints(args.prefill)) +
             " | decode b1 | peak VRAM GiB |", "|---|---|" + "---|" * (len(_ints(args.prefill)) + 2)]
    ps = _ints(args.prefill)
    cpu = args.cpu_only
    names = (("tandem (rules cpu)", "llama.cpp (CPU)", "transformers (CPU)") if cpu else
             ("tandem (rules 1gpu)", "llama.cpp -ngl 99 -ot exps=CPU", "transformers+accelerate"))
    for m in models:
        t, ll, hf = state.get(f"{m}:tandem", {}), state.get(f"{m}:llamacpp", {}), state.get(f"{m}:hf", {})

        def cells(res, ref=None, scale=1.0):
            out = []
            for p in ps:
                v = res.get("prefill", {}).get(str(p), {}).get("tok_s")
                r = ref.get("prefill", {}).get(str(p), {}).get("tok_s") if ref else None
                out.append("-" if v is None else f"{v * scale:.1f}" + (f" ({r / (v * scale):.2f}x)" if r else ""))
            d = res.get("decode_b1")
            rd = ref.get("decode_b1") if ref else None
            out.append("-" if d is None else f"{d * scale:.2f}" + (f" ({rd / (d * scale):.2f}x)" if rd else ""))
            return out

        vram = lambda res: f"{res.get('peak_vram_mib_smi', 0) / 1024:.1f}"  # noqa: E731
        lines.append(f"| {m} | {names[0]} | " + " | ".join(cells(t)) + f" | {vram(t)} |")
        lines.append(f"| {m} | {names[1]} | " + " | ".join(cells(ll, t)) + f" | {vram(ll)} |")
        if hf:
            depth = f"{hf.get('layers')}/{hf.get('full_layers')} layers, max_memory {hf.get('gpu_budget_mib')} MiB"
            same = hf.get("layers") == hf.get("full_layers")
            lines.append(f"| {m} | {names[2]} ({depth}, measured) | " + " | ".join(cells(hf, t if same
                                                                                                    else None)) +
                         f" | {vram(hf)} |")
            if hf.get("layers") != hf.get("full_layers"):
                s = hf["layers"] / hf["full_layers"]
                lines.append(f"| {m} | {names[2]} (scaled to full depth) | " +
                             " | ".join(cells(hf, t, s)) + " | - |")
    lines += ["", "## Greedy agreement (16 steps, same GGUF, same split)", ""]
    for m in models:
        g = state.get(f"{m}:agree", {})
        if not g:
            continue
        first = g.get("first_difference")
        lines.append(f"- {m}: " + ("all 16 ids equal" if first is None else
                     f"first difference at step {first}: tandem {g['tandem_ids'][first]}, llama.cpp "
                     f"{g['llama_ids'][first]}, llama.cpp's top-2 margin there {g['llama_margins'][first]:.4g}"))
    for m in models:
        prof = state.get(f"{m}:tandem", {}).get("profile")
        if prof:
            lines += ["", f"## tandem decode profile, {m} (torch profiler, 4 steps at batch 1)", "", "```", prof, "```"]
    lines += ["", "## Commands", "", "```", *dict.fromkeys(state.get("commands", [])), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main


def run(args) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(work, args.deadline, args.dry_run)
    models = (args.models or (CPU_MODELS if args.cpu_only else MODELS)).split(",")
    try:
        r.step("env", 5, lambda: environment(args))
        b = r.step("build", 60, lambda: build_llama(r, args))
        bins = Path(b["bin"]) if b else Path("BUILD/bin")
        if args.export_build:
            export_build(bins, Path(args.export_build))
            return 0
        for m in models:
            gguf = work / f"{m.replace(':', '-')}-{args.quant}.gguf"
            r.step(f"{m}:gguf", 60, lambda m=m, gguf=gguf: synth_gguf(r, m, gguf, args.quant))
            t = r.step(f"{m}:tandem", 150, lambda gguf=gguf: run_tandem(r, args, gguf))
            r.step(f"{m}:llamacpp", 150, lambda gguf=gguf: run_llama_bench(r, args, bins, gguf))
            r.step(f"{m}:agree", 60, lambda gguf=gguf, t=t: run_greedy(r, args, bins, gguf, (t or {}).get(
                "greedy_ids")))
            if not args.keep and not args.dry_run:
                gguf.unlink(missing_ok=True)  # room on the disk for the safetensors
            if not args.no_hf:
                vram = (t or {}).get("peak_vram_mib_smi", 0)
                need = 60 + 40 * args.hf_layers if args.hf_layers else 420  # synth, load, 3 prefills, decode
                r.step(f"{m}:hf", need, lambda m=m, vram=vram: run_hf(r, args, m, vram))
    except Incomplete as e:
        print(f"incomplete: {e}; run the same command again (finished steps are kept in {r.state_path})")
        return 3
    if args.dry_run:
        return 0
    text = report(r.state, args, models)
    results = Path(args.results) if args.results else ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    name = f"peers-{'cpu-' if args.cpu_only else ''}{datetime.date.today().isoformat()}.md"
    (results / name).write_text(text)
    (results / name.replace(".md", ".json")).write_text(json.dumps(r.state, indent=1))
    print(text)
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("_tandem", "_hf"):
        (child_tandem if sys.argv[1] == "_tandem" else child_hf)(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="trim the llama-cpp-python sdist into build/peers/ (carry it to the device)")
    p.add_argument("sdist")
    p = sub.add_parser("run", help="the benchmark (resumable)")
    p.add_argument("--work", default="/tmp/tandem-peers", help="build, models and state.json")
    p.add_argument("--results", default=None, help="where the report goes (default bench/results; $OUT on a device)")
    p.add_argument("--deadline", type=float, default=540, help="seconds this call may run")
    p.add_argument("--models", default=None, help=f"PRESET[:LAYERS], comma separated (default {MODELS}; e.g. "
                   "deepseek-v3:4 for DeepSeek-V3 cut to 4 layers)")
    p.add_argument("--quant", default="Q4_K_M-like")
    p.add_argument("--threads", type=int, default=None, help="default: physical cores")
    p.add_argument("--prefill", default="512,2048,8192")
    p.add_argument("--ubatch", default="512,2048", help="llama-bench -ub values tried for prefill")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--hf-decode-tokens", type=int, default=4)
    p.add_argument("--hf-layers", type=int, default=None, help="default: as deep as the disk holds")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the model files")
    p.add_argument("--cpu-only", action="store_true", help="no GPU: tiny models, CPU builds (a local check)")
    p.add_argument("--llama-build", default=None, help="an existing llama.cpp build directory (skips the build)")
    p.add_argument("--llama-src", default=None, help="its source (vendor/llama.cpp) for the greedy driver")
    p.add_argument("--export-build", default=None, help="after the build, write its binaries to this folder as "
                   "xz parts of 15 MiB (to carry into a later device call) and stop")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(Path(args.sdist))
        return 0
    if args.threads is None:
        args.threads = _physical_cores()
    return run(args)


def _physical_cores() -> int:
    try:
        out = subprocess.run(["lscpu", "-p=core,socket"], capture_output=True, text=True).stdout
        return len({ln for ln in out.splitlines() if not ln.startswith("#")}) or os.cpu_count() or 1
    except OSError:
        return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
