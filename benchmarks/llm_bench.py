"""Costs of clpeft's LLM path against plain transformers + peft (issue 25, "Measured").

Continual instruction tuning trains a LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022, https://arxiv.org/abs/2106.09685) on a decoder LLM's attention
projections and scores greedy answers, as O-LoRA does (Wang et al., EMNLP 2023 Findings,
https://arxiv.org/abs/2310.14152). Two costs, each measured side by side in one process on the
same weights (``--weights``, default the packaged SmolLM2-135M-Instruct):

* **(a) LoRA training step.** clpeft: what the engine does for ``seq_finetune`` --
  :class:`~clpeft.components.generative.InstructionTuning` injects the LoRA,
  ``GenerativeLM.loss(examples)`` tokenizes the batch and gives the answer-token loss, and
  :func:`clpeft.training.optimizer_step` runs backward and the Adam step on the adapters. Plain:
  ``peft.get_peft_model`` with the same ``LoraConfig`` (rank ``--rank`` on ``q_proj`` and
  ``v_proj``, alpha ``--alpha``, no dropout), the usual collate (chat template, labels ``-100``
  on prompt and padding, right padding) inside the timed step, ``model(..., labels=...).loss``,
  backward, ``Adam.step``. Both start from the same LoRA factors (clpeft's copied into peft's) and
  see the same batches in the same order, so they compute the same updates: every step's loss
  and the final factors are compared (relative difference of the stacked factors).
  Throughput: real (non-padding) tokens per step over the median step time.
* **(b) Evaluation.** clpeft's batched greedy decoding with the KV cache
  (``GenerativeLM.generate(prompts, max_new_tokens)``, one left-padded batch) against a
  per-sample ``model.generate(ids, max_new_tokens=..., do_sample=False)`` loop of the base model;
  the answers must be identical.

**Timing.** ``--warmup`` rounds, then ``--steps`` (``--repeats``) rounds; each round runs both
sides once, the order alternating between rounds, so a shared machine's load hits both alike.
Medians of wall time (``time.perf_counter``) and of CPU time (``time.process_time``, all threads
of this process: on a loaded machine it does not count the time other processes hold the cores,
so it is the steadier of the two; tokens per CPU-second then read as the work a step needs).
With more threads than free cores, though, OpenMP's workers spin while they wait for each other
and both times grow several-fold, the small ops of one-token decoding most: on the 2-core
sandbox at load 5 a SmolLM2 step took 3.2 CPU-s at ``--threads 1`` and 14-19 at ``--threads 2``,
and the per-sample generation loop 15 and 210. Ratios stay fair (both sides share every round's
load) but swing; on a loaded machine compare at ``--threads 1``.

**Peak memory (CPU).** Each side runs in a fresh subprocess of this script (``--probe``): it
notes its resident set (``VmRSS``, torch and transformers imported), loads the model, injects the
LoRA, builds the optimizer and takes one step (every weight is read once -- transformers may map
the weights file lazily -- and Adam's state exists), returns free heap to the system
(``malloc_trim``), resets the kernel's peak resident set size (``VmHWM``) to the current one
through ``/proc/self/clear_refs`` and notes that ``VmRSS``, then takes ``--memory-steps`` steps.
"Trained model" is the second ``VmRSS`` minus the first; the step's peak is ``VmHWM`` minus the
second (activations, gradients, allocator slack). ``ru_maxrss`` cannot be reset and would report
the loading peak (state dict and model at once) whenever that is higher; a fresh process per side
keeps one side's freed heap from being reused unseen by the other.

    OMP_NUM_THREADS=2 python benchmarks/llm_bench.py --threads 2    # SmolLM2: 21.5 min on the sandbox at load 5
    OMP_NUM_THREADS=1 python benchmarks/llm_bench.py --threads 1    # 3.5 min there: the steadier choice
    python benchmarks/llm_bench.py --steps 20 --repeats 7 --new-tokens 48   # steadier medians, longer answers
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from clpeft.backbones.generative_lm import IGNORE, GenerativeLM, load_causal_lm  # noqa: E402
from clpeft.backbones.text import TEXT_WEIGHTS, text_weights_source  # noqa: E402
from clpeft.components.generative import GenerativeOptions, InstructionTuning  # noqa: E402
from clpeft.instructions import Instruction  # noqa: E402
from clpeft.scenarios.instruction_tasks import GENERATORS, generated_task  # noqa: E402
from clpeft.training import optimizer_step  # noqa: E402

TARGETS = ("q_proj", "v_proj")
LR = 1e-3
TOLERANCE = 1e-4  # relative difference of losses and of the LoRA factors that still counts as the same update


# ---------------------------------------------------------------- data


def training_examples(n: int, seed: int = 0, items: int = 2) -> list[Instruction]:
    """``n`` instructions of ``items`` built-in generated tasks each (one per line, answers one per
    line): about 63 SmolLM2 tokens with its chat template (52-74)."""
    names = sorted(GENERATORS)
    pool = {name: generated_task(name, n * items, seed, 16) for name in names}
    examples = []
    for i in range(n):
        picked = [pool[names[(i + k) % len(names)]][i * items + k] for k in range(items)]
        examples.append(Instruction("\n".join(e.prompt for e in picked), "\n".join(e.target for e in picked)))
    return examples


def generation_prompts(n: int, seed: int = 1) -> list[str]:
    """``n`` prompts of the built-in generated tasks, cycling through them (lengths differ: the batch is padded)."""
    names = sorted(GENERATORS)
    pool = {name: generated_task(name, n, seed, 16) for name in names}
    return [pool[names[i % len(names)]][i].prompt for i in range(n)]


def model_source(weights: str) -> str:
    """The transformers directory (or hub id) behind ``weights``, for the plain side."""
    return text_weights_source(weights, "causal_lm", None, "")[0]


# ---------------------------------------------------------------- the two training steps


def plain_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The usual prompt of a transformers loop: the user turn in the chat template with the
    assistant's generation prompt, or (no template) the prompt and a newline."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes its special tokens
    return list(tokenizer(prompt + "\n")["input_ids"])


class ClpeftSide:
    """clpeft's seq_finetune step: InstructionTuning's LoRA, ``GenerativeLM.loss``, the engine's optimizer step."""

    def __init__(self, weights: str, rank: int, alpha: float):
        self.backbone = GenerativeLM(weights=weights)
        self.tuning = InstructionTuning(self.backbone, GenerativeOptions(lora_rank=rank, lora_alpha=alpha, general_text_samples=0))
        self.backbone.train()
        self.optimizer = torch.optim.Adam(list(self.tuning.trainable().values()), lr=LR)

    def step(self, examples: Sequence[Instruction]) -> float:
        loss = self.tuning.loss(examples)
        optimizer_step(self.optimizer, loss, None)
        return float(loss.detach())

    def factors(self) -> dict[str, torch.Tensor]:
        """The LoRA factors by module path and ``A``/``B``."""
        return {".".join(n.rsplit(".lora_", 1)): p.detach() for n, p in self.tuning.trainable().items()}


class PlainSide:
    """A plain transformers + peft loop: collate, ``model(..., labels=...).loss``, backward, Adam step."""

    def __init__(self, weights: str, rank: int, alpha: float):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = model_source(weights)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        base = AutoModelForCausalLM.from_pretrained(source).float()
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(base, config).train()
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=LR)

    def collate(self, examples: Sequence[Instruction]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` but on the answer and its end token)."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = []
        for e in examples:
            prompt = plain_prompt_ids(tok, e.prompt)
            answer = [*tok(e.target, add_special_tokens=False)["input_ids"], tok.eos_token_id]
            rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        return {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in rows]),
        }

    def step(self, examples: Sequence[Instruction]) -> float:
        loss = self.model(**self.collate(examples)).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def factors(self) -> dict[str, torch.Tensor]:
        """The LoRA factors under clpeft's names (``model.layers.0.self_attn.q_proj.A``)."""
        found = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                path, kind = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.default\.weight", name).groups()
                found[f"{path}.{kind}"] = p.detach()
        return found

    def copy_factors(self, factors: dict[str, torch.Tensor]) -> None:
        """Start from clpeft's factors."""
        mine = self.factors()
        if mine.keys() != factors.keys():
            raise RuntimeError(f"the two sides adapt different layers: {sorted(mine.keys() ^ factors.keys())[:4]}")
        with torch.no_grad():
            for name, value in factors.items():
                mine[name].copy_(value)


SIDES = {"clpeft": ClpeftSide, "plain": PlainSide}


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over all factors stacked (a single factor whose gradient is ~0 may
    flip under Adam's normalisation; the whole update may not move)."""
    diff = sum(float((a[n] - b[n]).pow(2).sum()) for n in b)
    norm = sum(float(b[n].pow(2).sum()) for n in b)
    return (diff / max(norm, 1e-30)) ** 0.5


# ---------------------------------------------------------------- timing


def _timed(fn: Callable[[int], object], r: int) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(r)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def _rounds(sides: dict[str, Callable[[int], object]], warmup: int, repeats: int) -> tuple[dict, dict, dict]:
    """Run every side once per round (order alternating), ``warmup + repeats`` rounds; the wall
    and CPU times of the timed rounds, and every round's output, per side."""
    wall: dict[str, list[float]] = {n: [] for n in sides}
    cpu: dict[str, list[float]] = {n: [] for n in sides}
    outs: dict[str, list] = {n: [] for n in sides}
    names = list(sides)
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            w, c, out = _timed(sides[name], r)
            outs[name].append(out)
            if r >= warmup:
                wall[name].append(w)
                cpu[name].append(c)
    return wall, cpu, outs


def _memory_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def probe_memory(side: str, weights: str, rank: int, alpha: float, batch: int, steps: int) -> dict[str, float]:
    """Run in a fresh process: what the trained model holds and its training steps' peak above it, in MiB (module docstring)."""
    start = _memory_kb("VmRSS")
    model = SIDES[side](weights, rank, alpha)
    batches = _batches(batch, steps + 1)
    model.step(batches[0])  # every weight read once (loading may map them lazily), the optimizer's state allocated
    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _memory_kb("VmRSS")
    for examples in batches[1:]:
        model.step(examples)
    return {"model_mib": (base - start) / 1024, "step_peak_mib": (_memory_kb("VmHWM") - base) / 1024}


def _memory_in_subprocess(side: str, weights: str, rank: int, alpha: float, batch: int, steps: int, threads: int) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", side, "--weights", weights, "--rank", str(rank)]
    command += ["--alpha", str(alpha), "--batch", str(batch), "--memory-steps", str(steps), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"memory probe of {side} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _batches(batch: int, count: int) -> list[list[Instruction]]:
    examples = training_examples(batch * count)
    return [examples[i * batch : (i + 1) * batch] for i in range(count)]


# ---------------------------------------------------------------- (a) and (b)


def measure_training(
    weights: str,
    batch: int = 8,
    steps: int = 4,
    warmup: int = 1,
    rank: int = 8,
    alpha: float = 16.0,
    memory_steps: int = 2,
    threads: int = 1,
) -> dict:
    """(a): both sides' step times, tokens, losses, final factors' agreement and (``memory_steps > 0``) peak memory."""
    clpeft, plain = ClpeftSide(weights, rank, alpha), PlainSide(weights, rank, alpha)
    start = {n: p.clone() for n, p in clpeft.factors().items()}
    plain.copy_factors(start)
    batches = _batches(batch, warmup + steps)
    same_tokens = all(torch.equal(clpeft.backbone.training_batch(b)[0], plain.collate(b)["input_ids"]) for b in batches)
    wall, cpu, losses = _rounds({"clpeft": lambda r: clpeft.step(batches[r]), "plain": lambda r: plain.step(batches[r])}, warmup, steps)
    loss_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["clpeft"], losses["plain"]))
    factor_diff = relative_difference(clpeft.factors(), plain.factors())
    moved = relative_difference(clpeft.factors(), start)
    tokens = statistics.mean(int(plain.collate(b)["attention_mask"].sum()) for b in batches[warmup:])
    memory = {}
    if memory_steps:
        memory = {side: _memory_in_subprocess(side, weights, rank, alpha, batch, memory_steps, threads) for side in SIDES}
    return {
        "batch": batch,
        "rank": rank,
        "tokens": tokens,
        "wall": {n: statistics.median(v) for n, v in wall.items()},
        "cpu": {n: statistics.median(v) for n, v in cpu.items()},
        "losses": losses,
        "same_tokens": same_tokens,
        "loss_diff": loss_diff,
        "factor_diff": factor_diff,
        "factors_moved": moved,
        "agree": same_tokens and loss_diff < TOLERANCE and factor_diff < TOLERANCE and moved > 100 * factor_diff,
        "memory": memory,
    }


def measure_generation(weights: str, prompts: int = 16, new_tokens: int = 16, repeats: int = 3, warmup: int = 1) -> dict:
    """(b): clpeft's batched KV-cache greedy decoding against a per-sample ``generate`` loop; answers compared."""
    backbone = GenerativeLM(weights=weights)
    net, tokenizer = load_causal_lm(model_source(weights))
    texts = generation_prompts(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def per_sample() -> list[str]:
        answers = []
        for text in texts:
            ids = torch.tensor([plain_prompt_ids(tokenizer, text)])
            out = net.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
            )
            answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return answers

    wall, cpu, outs = _rounds({"clpeft": lambda r: backbone.generate(texts, new_tokens), "plain": lambda r: per_sample()}, warmup, repeats)
    answers = {n: v[-1] for n, v in outs.items()}
    generated = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers["plain"])
    same = sum(a == b for a, b in zip(answers["clpeft"], answers["plain"]))
    stable = all(o == answers[n] for n, v in outs.items() for o in v)
    return {
        "prompts": prompts,
        "new_tokens": new_tokens,
        "generated": generated,
        "wall": {n: statistics.median(v) for n, v in wall.items()},
        "cpu": {n: statistics.median(v) for n, v in cpu.items()},
        "answers": answers,
        "identical": same,
        "agree": same == prompts and stable,
    }


# ---------------------------------------------------------------- tables


def machine() -> str:
    """CPU model, threads, library versions and the date, one line."""
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{cpu}, {torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; {day}"
    )


def training_table(result: dict, model: str) -> str:
    """(a) as Markdown: one row per side, then the ratios and the agreement."""
    tokens = result["tokens"]
    lines = [
        f"**LoRA training step** ({model}, batch {result['batch']}, {tokens:.0f} tokens a step, rank-{result['rank']} q/v LoRA, Adam)",
        "",
        "| loop | step wall (s) | tokens/s (wall) | step CPU (s) | tokens/CPU-s | trained model (MiB) | step peak above it (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, label in (("clpeft", "clpeft seq_finetune"), ("plain", "transformers + peft")):
        mem = result["memory"].get(side, {})
        model_mib = f"{mem['model_mib']:.0f}" if mem else "-"
        peak = f"{mem['step_peak_mib']:.0f}" if mem else "-"
        wall, cpu = result["wall"][side], result["cpu"][side]
        lines.append(f"| {label} | {wall:.3f} | {tokens / wall:.1f} | {cpu:.3f} | {tokens / cpu:.1f} | {model_mib} | {peak} |")
    ratio_wall = result["wall"]["plain"] / result["wall"]["clpeft"]
    ratio_cpu = result["cpu"]["plain"] / result["cpu"]["clpeft"]
    lines.append("")
    lines.append(f"clpeft / plain throughput: {ratio_wall:.3f}x (wall), {ratio_cpu:.3f}x (CPU); goal >= 0.95x.")
    if result["memory"]:
        mem = result["memory"]
        step = mem["clpeft"]["step_peak_mib"] / mem["plain"]["step_peak_mib"]
        total = [mem[s]["model_mib"] + mem[s]["step_peak_mib"] for s in ("clpeft", "plain")]
        lines.append(f"clpeft / plain peak memory: {step:.3f}x (step), {total[0] / total[1]:.3f}x (model + step); goal <= 1.")
    lines.append(
        f"Agreement: same tokens {result['same_tokens']}; every step's loss within {result['loss_diff']:.1e} (relative); "
        f"LoRA factors after {len(result['losses']['plain'])} steps differ by {result['factor_diff']:.1e} (relative, "
        f"they moved {result['factors_moved']:.2f} from the start): {'AGREE' if result['agree'] else 'DISAGREE'}."
    )
    return "\n".join(lines)


def generation_table(result: dict, model: str) -> str:
    """(b) as Markdown: one row per side, then the speed-up and the agreement."""
    n, k, generated = result["prompts"], result["new_tokens"], result["generated"]
    lines = [
        f"**Greedy evaluation** ({model}, {n} prompts x up to {k} new tokens, {generated} generated)",
        "",
        "| generation | wall (s) | tokens/s (wall) | CPU (s) | tokens/CPU-s |",
        "|---|---|---|---|---|",
    ]
    for side, label in (("clpeft", "clpeft batched, KV cache"), ("plain", "per-sample model.generate")):
        wall, cpu = result["wall"][side], result["cpu"][side]
        lines.append(f"| {label} | {wall:.3f} | {generated / wall:.1f} | {cpu:.3f} | {generated / cpu:.1f} |")
    speed_wall = result["wall"]["plain"] / result["wall"]["clpeft"]
    speed_cpu = result["cpu"]["plain"] / result["cpu"]["clpeft"]
    lines.append("")
    lines.append(f"Speed-up of the batched decoding: {speed_wall:.2f}x (wall), {speed_cpu:.2f}x (CPU); goal >= 5x.")
    lines.append(f"Agreement: {result['identical']}/{n} answers identical: {'AGREE' if result['agree'] else 'DISAGREE'}.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="smollm2-135m", help=f"packaged name ({', '.join(TEXT_WEIGHTS)}) or a model directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before (training and generation)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of each memory probe (0: no memory probe)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed generation rounds per side")
    parser.add_argument("--part", choices=["train", "generate", "both"], default="both")
    parser.add_argument("--probe", choices=list(SIDES), help=argparse.SUPPRESS)  # internal: one side's memory probe
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.probe:
        print(json.dumps(probe_memory(args.probe, args.weights, args.rank, args.alpha, args.batch, args.memory_steps)))
        return
    model = Path(args.weights).name
    print(machine(), flush=True)
    if args.part in ("train", "both"):
        result = measure_training(args.weights, args.batch, args.steps, args.warmup, args.rank, args.alpha, args.memory_steps, args.threads)
        print("\n" + training_table(result, model), flush=True)
    if args.part in ("generate", "both"):
        result = measure_generation(args.weights, args.prompts, args.new_tokens, args.repeats, args.warmup)
        print("\n" + generation_table(result, model), flush=True)


if __name__ == "__main__":
    main()
