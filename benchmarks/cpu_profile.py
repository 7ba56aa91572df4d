"""Where a CPU training step's time goes, ours and diffusers' side by side (torch.profiler).

Each tool's step (ours: `diffuse train`'s; diffusers': the plain eager step its training script takes) runs a
few times under torch.profiler. Every operator's own time is counted in a group, by the module it ran in (each
module's forward is marked, and each backward operator is matched to the forward one that made it, by autograd's
sequence number), and by phase: forward, backward, optimizer (clipping, AdamW, EMA). The groups: convolution
(3x3 and 1x1, and ours's Winograd products), upsampling (the module whole: diffusers' enlargement and 3x3
convolution, our transposed convolution), norm (GroupNorm), attention (SDPA and its reshapes), linear (the time
embedding; diffusers' attention projections, which ours computes as 1x1 convolutions), elementwise (SiLU,
dropout, the residual adds, concatenation) and copies (layout changes, copies), and the step's own work (the
loss, the noise mixing). What `diffuse train` does for a step outside the network (the batch's images, t, ε and
flips, the thread count, the progress record) is benchmarks/cli_speed.py's to measure.

    pip install -e '.[bench]'
    python benchmarks/cpu_profile.py                                 # ddpm-cifar10 and small, batch 16, fp32
    python benchmarks/cpu_profile.py --isa avx2                      # an AVX-512/AMX machine as AVX2 runs
    python benchmarks/cpu_profile.py --presets small --batch 64 --precision bf16
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from common import ISA_ENVIRONMENTS, machine_line, train_step_fn, with_isa  # noqa: E402
from train_speed import contestant  # noqa: E402

from diffuse_cli.network import unet  # noqa: E402
from diffuse_cli.network.fast_ops import keep_cpu_memory  # noqa: E402

GROUPS = ("convolution", "upsampling", "norm", "attention", "linear", "elementwise", "copies", "step")
PHASES = ("forward", "backward", "optimizer")
MARK = "group:"
COPIES = re.compile(r"copy|contiguous|clone|to_copy|as_strided_|permute|transpose")
OPTIMIZER = re.compile(r"adam|optimizer|clip_grad|vector_norm|foreach|lerp|_amp_")


def module_group(module: nn.Module) -> str | None:
    """The group of a module's own work, for either tool (None: its parts are marked, not itself)."""
    name = type(module).__name__
    if isinstance(module, unet.Upsample) or name == "Upsample2D":
        return "upsampling"
    if isinstance(module, nn.GroupNorm):
        return "norm"
    if isinstance(module, unet.Attention) or name == "Attention":
        return "attention"
    if isinstance(module, nn.Conv2d):
        return "convolution"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def mark_modules(model: nn.Module) -> None:
    """Wrap each grouped module's forward in a profiler range named for its group (an upsampling's own
    convolution counts as upsampling: the innermost mark names an operator's group)."""
    inside_upsampling = {id(m) for up in model.modules() if module_group(up) == "upsampling" for m in up.modules()}
    for module in model.modules():
        group = module_group(module)
        if group is None or (group != "upsampling" and id(module) in inside_upsampling):
            continue
        ranges: list = []

        def enter(mod, args, group=group, ranges=ranges):
            ranges.append(record_function(MARK + group))
            ranges[-1].__enter__()

        def leave(mod, args, out, ranges=ranges):
            ranges.pop().__exit__(None, None, None)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def classify(events) -> dict[tuple[str, str], float]:
    """Milliseconds of own time by (phase, group), over the profiled events."""
    forward_group: dict[int, str] = {}  # autograd sequence number -> the group of the forward operator

    def ancestors(e):
        while e is not None:
            yield e
            e = e.cpu_parent

    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            mark = next((a.name[len(MARK):] for a in ancestors(e) if a.name.startswith(MARK)), None)
            if mark is not None:
                forward_group.setdefault(e.sequence_nr, mark)
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for e in events:
        if e.name.startswith(MARK) or e.self_cpu_time_total <= 0:
            continue
        chain = list(ancestors(e))
        node = next((a for a in chain if a.name.startswith("autograd::engine::evaluate_function")), None)
        mark = next((a.name[len(MARK):] for a in chain if a.name.startswith(MARK)), None)
        lowered = e.name.lower()
        if any(OPTIMIZER.search(a.name.lower()) for a in chain) and node is None:
            phase, group = "optimizer", "step"
        elif node is not None:
            phase = "backward"
            group = forward_group.get(node.sequence_nr) or ("copies" if COPIES.search(node.name.lower()) else
                                                            "elementwise")
        else:
            phase = "forward"
            group = mark or ("copies" if COPIES.search(lowered) else "step" if re.search(r"mse|loss|randn|rand", lowered)
                             else "elementwise")
        totals[(phase, group)] += e.self_cpu_time_total / 1000
    return totals


def profile_step(impl: str, preset: str, batch: int, precision: str, steps: int) -> tuple[dict, float]:
    """({(phase, group): ms a step}, wall ms a step unprofiled) of one tool's training step."""
    model, net, x0, t, eps, optimizer = contestant(impl, preset, batch, precision, torch.device("cpu"),
                                                   our_runtime=impl == "ours")
    mark_modules(model)
    step = train_step_fn(model, net, x0, t, eps, precision, optimizer)
    for _ in range(3):
        step()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - began) / steps * 1000
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {k: v / steps for k, v in classify(prof.events()).items()}, wall


def table(rows: dict[str, dict], walls: dict[str, float]) -> str:
    """Ours and diffusers' milliseconds by group (forward + backward) and by phase, as a markdown table."""
    names = list(rows)
    lines = ["| group | " + " | ".join(f"{n} fwd | {n} bwd" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for group in GROUPS:
        cells = [f"{rows[n].get(('forward', group), 0):.0f} | {rows[n].get(('backward', group), 0):.0f}" for n in names]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines.append("| optimizer (clip, AdamW, EMA) | " + " | ".join(
        f"{sum(v for (p, _), v in rows[n].items() if p == 'optimizer'):.0f} | " for n in names) + " |")
    lines.append("| profiled total | " + " | ".join(f"{sum(rows[n].values()):.0f} | " for n in names) + " |")
    lines.append("| step, unprofiled | " + " | ".join(f"{walls[n]:.0f} | " for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["ddpm-cifar10", "small"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps of each (after 3 to warm up)")
    parser.add_argument("--isa", choices=sorted(ISA_ENVIRONMENTS))
    args = parser.parse_args()
    with_isa(args.isa)
    keep_cpu_memory()  # both tools: this compares where the time goes, not the runtimes
    print(machine_line("cpu") + f"; batch {args.batch}, {args.precision}, 32x32; ms a step (own time of each "
          "operator, by the module it ran in)", flush=True)
    for preset in args.presets:
        rows, walls = {}, {}
        for impl in ("ours", "diffusers"):
            rows[impl], walls[impl] = profile_step(impl, preset, args.batch, args.precision, args.steps)
        print(f"\n{preset}\n{table(rows, walls)}", flush=True)


if __name__ == "__main__":
    main()
