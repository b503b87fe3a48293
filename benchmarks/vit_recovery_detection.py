#!/usr/bin/env python
"""Detection recovery: a plain ViT (ViTDet) Mask R-CNN converted into a Rev-ViT one and
fine-tuned reversibly, against the plain detector, on the built-in synthetic COCO set.

Four box APs on the validation split, every step through tools/train_net.py (one process each):

1. ``plain``: detectron2's ViT in the demo's Mask R-CNN (configs/COCO/mask_rcnn_vit_synthetic.py,
   ``use_rel_pos=False``), trained from scratch for ``--plain-iters``;
2. ``converted``: its ``model_final.pth`` into the Rev-ViT demo detector
   (configs/COCO/mask_rcnn_revvit_synthetic.py with the plain patch projection,
   ``stem=None``, and Re^2TAL's fusion ``fuse="avg_prenorm"``) through
   ``train.init_checkpoint`` (format 'vitdet': the ViT converted, the pyramid, RPN and ROI
   heads loaded by name), evaluated before any training;
3. ``converted_finetuned``: the same, fine-tuned with the reversible backward for
   ``--finetune-iters`` (the demo's schedule shape at ``--finetune-lr``);
4. ``plain_finetuned``: the plain detector fine-tuned the same steps at the same lr (what the
   extra steps alone give).

    nice -n 10 env OMP_NUM_THREADS=2 python benchmarks/vit_recovery_detection.py \
        --out docs/results/vit_recovery_detection_cpu

``--smoke``: 2 + 2 iterations on a tiny generated set (a check that the pipeline runs and the
JSON is well formed; its numbers mean nothing).
"""
import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN_CONFIG = "configs/COCO/mask_rcnn_vit_synthetic.py"
REV_CONFIG = "configs/COCO/mask_rcnn_revvit_synthetic.py"
# The demo's Rev-ViT with the plain ViT's tokeniser and Re^2TAL's fusion (docs/vit_import.md).
REV_AS_PLAIN = ["model.backbone.net.stem=null", "model.backbone.net.fuse=avg_prenorm"]
SMOKE_NAMES = ("revvit_recovery_smoke_train", "revvit_recovery_smoke_val")
ROWS = ("plain", "converted", "converted_finetuned", "plain_finetuned")
LABELS = {
    "plain": "plain ViT (detectron2 `ViT`)",
    "converted": "converted to Rev-ViT (re2tal), before fine-tuning",
    "converted_finetuned": "converted + fine-tuned reversibly",
    "plain_finetuned": "plain + fine-tuned the same steps",
}


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", ROOT / "tools" / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_step(spec: dict) -> None:
    """One tools/train_net.py run in this process (``--step``): train (the AP comes from its
    metrics.json) or ``--eval-only`` (the AP is written to ``spec["result"]``)."""
    tool = _train_net()
    if spec["smoke_root"]:  # a tiny set under its own names instead of the default one
        from revvit_d2.d2.data import register_synthetic_coco
        register_synthetic_coco(spec["smoke_root"], names=SMOKE_NAMES, num_train=8, num_val=4)
    argv = ["--config-file", str(ROOT / spec["config"])] + (
        ["--eval-only"] if spec["eval_only"] else []) + spec["overrides"]
    args = tool.tool_parser(tool.__doc__, str(tool.DEFAULT_CONFIG)).parse_args(argv)
    results = tool.main(args)
    if spec["eval_only"]:
        Path(spec["result"]).write_text(json.dumps(_aps(results)))


def _clean(v):
    v = float(v)
    return None if math.isnan(v) else round(v, 2)


def _aps(results: dict) -> dict:
    """box AP, AP50 and mask AP of detectron2's COCOEvaluator results (NaN -> None)."""
    return {"box_AP": _clean(results["bbox"]["AP"]), "box_AP50": _clean(results["bbox"]["AP50"]),
            "mask_AP": _clean(results["segm"]["AP"])}


def _last_eval(output_dir: Path) -> dict:
    rows = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]
    last = [r for r in rows if "bbox/AP" in r][-1]
    return {"bbox": {"AP": last["bbox/AP"], "AP50": last["bbox/AP50"]},
            "segm": {"AP": last["segm/AP"]}}


def _step(name, config, overrides, out: Path, args, eval_only=False) -> dict:
    """Run one step in a fresh process; its APs and wall time."""
    out_dir = out / name
    spec = dict(config=config, eval_only=eval_only, result=str(out / f"{name}.json"),
                overrides=overrides + [f"train.output_dir={out_dir}"],
                smoke_root=str(out / "data") if args.smoke else "")
    t0 = time.perf_counter()
    log = open(out / f"{name}.log", "w")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--step",
                           json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT,
                          cwd=str(ROOT), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log.close()
    if proc.returncode != 0:
        tail = (out / f"{name}.log").read_text().splitlines()[-15:]
        raise SystemExit(f"error: step {name} failed (exit {proc.returncode}):\n" +
                         "\n".join(tail))
    aps = json.loads(Path(spec["result"]).read_text()) if eval_only else _aps(
        _last_eval(out_dir))
    row = dict(model=name, label=LABELS[name], seconds=round(time.perf_counter() - t0, 1), **aps)
    print(json.dumps(row), flush=True)
    return row


def _schedule(iters: int, lr=None):
    extra = [f"train.max_iter={iters}", f"train.eval_period={iters}",
             f"train.checkpointer.period={iters}"]
    return extra + ([f"optimizer.lr={lr}"] if lr is not None else [])


def run(args, report) -> dict:
    """The four steps in order; ``report(result)`` after each, so that the rows of a run that
    stops early are kept."""
    out = Path(args.work_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = [] if not args.smoke else [
        f"dataloader.train.dataset.names={SMOKE_NAMES[0]}",
        f"dataloader.test.dataset.names={SMOKE_NAMES[1]}",
        f"dataloader.evaluator.dataset_name={SMOKE_NAMES[1]}"]
    common = data + [f"train.seed={args.seed}"]
    start = [f"train.init_checkpoint={out / 'plain' / 'model_final.pth'}"]
    ft = _schedule(args.finetune_iters, args.finetune_lr)
    steps = [
        ("plain", PLAIN_CONFIG, common + _schedule(args.plain_iters), False),
        ("converted", REV_CONFIG, common + REV_AS_PLAIN + start, True),
        ("converted_finetuned", REV_CONFIG, common + REV_AS_PLAIN + start + ft, False),
        ("plain_finetuned", PLAIN_CONFIG, common + start + ft, False),
    ]
    rows = []
    for name, config, overrides, eval_only in steps:
        rows.append(_step(name, config, overrides, out, args, eval_only=eval_only))
        result = _summary(rows)
        report(result)
    return result


def _summary(rows) -> dict:
    by = {r["model"]: r for r in rows}
    gap = None
    if "converted_finetuned" in by and None not in (by["plain"]["box_AP"],
                                                    by["converted_finetuned"]["box_AP"]):
        gap = round(by["plain"]["box_AP"] - by["converted_finetuned"]["box_AP"], 2)
    return {"rows": rows, "complete": len(rows) == len(ROWS),
            "box_AP_plain_minus_converted_finetuned": gap,
            "within_2_points": None if gap is None else gap <= 2.0}


def _machine() -> dict:
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write(result: dict, args, command: str) -> None:
    machine = _machine()
    doc = {"machine": machine, "command": command, "settings": {
        k: v for k, v in vars(args).items() if k != "step"}, **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [
        "# Detection recovery: plain ViT Mask R-CNN -> Rev-ViT (re2tal), synthetic COCO", "",
        f"{machine['cpu']} CPU ({machine['cpu_count']} cores, OMP_NUM_THREADS="
        f"{machine['omp_num_threads']}), torch {machine['torch']}, {machine['date']}; "
        f"`{command}`.", "",
        f"Plain detector: `{PLAIN_CONFIG}` trained {args.plain_iters} iterations from scratch "
        f"(seed {args.seed}). Converted: `{REV_CONFIG}` with `{' '.join(REV_AS_PLAIN)}`, "
        f"`train.init_checkpoint=<plain model_final.pth>`. Fine-tuning: {args.finetune_iters} "
        f"iterations at lr {args.finetune_lr:g} (the demo's warm-up + cosine shape), the same "
        f"for both. Box / mask AP on the validation split.", "",
        "| model | iterations | box AP | box AP50 | mask AP | wall s |",
        "|---|---:|---:|---:|---:|---:|"]
    iters = {"plain": args.plain_iters, "converted": args.plain_iters,
             "converted_finetuned": args.plain_iters + args.finetune_iters,
             "plain_finetuned": args.plain_iters + args.finetune_iters}
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {iters[r['model']]} | {fmt(r['box_AP'])} | "
                     f"{fmt(r['box_AP50'])} | {fmt(r['mask_AP'])} | {r['seconds']:.0f} |")
    gap = result["box_AP_plain_minus_converted_finetuned"]
    if not result["complete"]:
        lines += ["", f"**Incomplete run**: {len(result['rows'])} of {len(ROWS)} steps."]
    if gap is not None:
        lines += ["", f"Box AP of the plain detector minus the converted + fine-tuned one: "
                      f"{fmt(gap)} (target: at most 2 points; "
                      f"{'met' if result['within_2_points'] else 'not met'})."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plain-iters", type=int, default=800)
    p.add_argument("--finetune-iters", type=int, default=200)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--work-dir", default="./output/vit_recovery_detection")
    p.add_argument("--out", default="docs/results/vit_recovery_detection_cpu")
    p.add_argument("--smoke", action="store_true", help="2 + 2 iterations on a tiny set")
    p.add_argument("--step", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        return run_step(json.loads(args.step))
    if args.smoke:
        args.plain_iters = args.finetune_iters = 2
    command = " ".join(["python", "benchmarks/vit_recovery_detection.py"] + list(
        sys.argv[1:] if argv is None else argv))
    run(args, lambda result: write(result, args, command))


if __name__ == "__main__":
    main()
