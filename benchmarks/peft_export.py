"""What `flexmerge export --format peft` gives on a mid-sized synthetic Llama zoo: per rank rule,
the adapters' relative error, their bytes against one model's, the export's seconds, and how far
the logits of base + adapter are from the task's own export.

    python benchmarks/peft_export.py [--out DIR] [--tasks 4] [--hidden 256] [--layers 4]

The zoo: a random LlamaForCausalLM base and M fine-tunes of it, each a rank-16 update of every
Linear layer (a LoRA fine-tune, merged) plus a small dense perturbation of every weight, norms
and embeddings included (what full fine-tuning adds). Artifacts: TIES at M/2 x and Twin-Merging
(rank 16) at its smallest size. A benchmark, not a test."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

import flexmerge
from flexmerge.peft_export import export_peft

RULES = [{"rank": 8}, {"rank": 32}, {"rank": 128}, {"energy": 0.99}, {}, {"norms": "save"}]
IDS = torch.randint(0, 2000, (4, 32), generator=torch.Generator().manual_seed(0))


def make_zoo(root: Path, tasks: int, hidden: int, layers: int) -> tuple[Path, dict[str, Path]]:
    import transformers

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                      vocab_size=2048, max_position_embeddings=128)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "base")
    dirs = {}
    for t in range(tasks):
        g = torch.Generator().manual_seed(100 + t)
        model = transformers.LlamaForCausalLM(config).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    a, b = torch.randn(p.shape[0], 16, generator=g), torch.randn(16, p.shape[1], generator=g)
                    p.add_(0.02 * p.std() * (a @ b) / 16 ** 0.5)
                p.add_(0.002 * p.abs().mean() * torch.randn(p.shape, generator=g))
        dirs[f"t{t}"] = root / f"t{t}"
        model.save_pretrained(dirs[f"t{t}"])
    return root / "base", dirs


def logits_gap(flex, export_dir: Path, work: Path, mixed: bool) -> float:
    """The largest |logit| difference of base + adapter against the task's own export, over the
    tasks: in one mixed batch when peft can mix the adapters, else one adapter at a time."""
    import peft
    import transformers

    base = transformers.LlamaForCausalLM.from_pretrained(export_dir / "base")
    model = peft.PeftModel.from_pretrained(base, export_dir / "adapters" / flex.tasks[0], adapter_name=flex.tasks[0])
    for t in flex.tasks[1:]:
        model.load_adapter(export_dir / "adapters" / t, adapter_name=t)
    model.eval()
    gap = 0.0
    with torch.no_grad():
        if mixed:
            batch = model(input_ids=IDS[: len(flex.tasks)], adapter_names=list(flex.tasks)).logits
        for i, t in enumerate(flex.tasks):
            if not mixed:
                model.set_adapter(t)
            got = batch[i] if mixed else model(input_ids=IDS[i:i + 1]).logits[0]
            flexmerge.export(flex, t, work / f"full-{t}", overwrite=True)
            own = transformers.LlamaForCausalLM.from_pretrained(work / f"full-{t}").eval()(input_ids=IDS[i:i + 1])
            gap = max(gap, float((got - own.logits[0]).abs().max()))
    return gap


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/flexmerge-peft-bench"))
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    base, dirs = make_zoo(args.out / "zoo", args.tasks, args.hidden, args.layers)
    tasks = flexmerge.load_tasks(base, dirs)
    artifacts = {f"ties {args.tasks / 2:g}x": flexmerge.merge(tasks, method="ties", size=args.tasks / 2),
                 "twin rank 16": flexmerge.merge(tasks, method="twin", size="min", params={"rank": 16})}
    print("artifact | rule | mean relative error | max relative error | adapter bytes / one model | seconds "
          "| max logit gap against the export")
    for name, flex in artifacts.items():
        for rule in RULES:
            out = args.out / "export"
            t0 = time.perf_counter()
            result = export_peft(flex, out, overwrite=True, **rule)
            seconds = time.perf_counter() - t0
            errors = [r.relative_error for r in result.reports.values()]
            ratio = sum(r.nbytes for r in result.reports.values()) / len(errors) / flex.unit_bytes
            lossless = "rank" not in rule and "energy" not in rule
            gap = logits_gap(flex, out, args.out, mixed=result.mixed_batches) if lossless else float("nan")
            label = ", ".join(f"{k} {v}" for k, v in rule.items() if k != "norms") or "lossless"
            label += ", norms saved" if rule.get("norms") == "save" else ""
            print(f"{name} | {label} | {sum(errors) / len(errors):.3g} | {max(errors):.3g} | {ratio:.3f} | "
                  f"{seconds:.1f} | {gap:.2g}")


if __name__ == "__main__":
    main()
