#!/usr/bin/env python
"""Per-process memory of sharded (FSDP2) reversible training: Rev-ViT-L and Rev-ViT-H with 1, 2
and 4 processes, and the working memory against depth.

Each configuration is trained for ``--steps`` AdamW steps (forward, cross-entropy, reversible
backward, ``opt.step()``, ``zero_grad(set_to_none=True)``) by N processes started for it alone:
N = 1 trains the unsharded model; N > 1 applies :func:`revvit_d2.shard_model` (gloo on the CPU,
NCCL on GPUs), each process training its own batch of ``--batch`` images (data parallel: the
per-process batch is fixed, the global one is N times it). The model is built on the meta
device, sharded, then materialised with ``to_empty`` and filled with random weights (their
values do not matter to memory), as FSDP2 recommends for large models: a process never holds the
full model, which would otherwise set its peak.

Per process it reports:

* **states**: parameters + gradients + AdamW state, *computed* from the local shards after the
  last step (local numel x bytes per element, summed over parameters, their ``.grad`` and the
  optimizer's state tensors). With N processes each holds about 1/N of them; the script prints
  the measured ratios to N = 1, it does not assert them.
* **baseline**: the process's peak RSS with torch and revvit_d2 imported and nothing built (and,
  separately, after the process group is up), so the model's share is visible.
* **peak**: the process's peak RSS over the whole run (``ru_maxrss``), and
  ``peak - baseline - states``: the working memory (activations, the gathered blocks being
  computed and prefetched, a branch's full gradients before their reduce-scatter, collective
  buffers, allocator slack). On the CPU each process is a fresh child of this small parent
  (Linux keeps ``ru_maxrss`` across ``execve``: :mod:`peak_rss`) with glibc's mmap threshold
  pinned, as in the other CPU memory benchmarks. With ``--device cuda``:
  ``torch.cuda.max_memory_allocated`` of each rank (one process per GPU; with fewer GPUs than N
  that N is skipped, so one GPU measures N = 1 only).

The depth sweep (``--depths``, at ``--depth-world`` processes, width 512) shows that the
working memory stays flat in depth with the reversible engine, against the same sharded model
trained with plain autograd (``use_rev_backprop=False``), whose saved activations grow with
every block; the states grow with depth in both and are reported apart.

Examples::

    python benchmarks/fsdp_memory.py                   # docs/results/fsdp_memory_cpu.{md,json,png}
    python benchmarks/fsdp_memory.py --smoke --out /tmp/fm        # tiny widths, seconds
    python benchmarks/fsdp_memory.py --device cuda                # docs/results/fsdp_memory_gpu.*
"""
import argparse
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from peak_rss import (MALLOC_ENV, ROOT, command_line, dispatch, machine_info, maxrss_kib,
                      measure_in_child, measured_on)

MIB = 2.0 ** 20
# name -> (registered variant, overrides); the depth sweep uses "l" with depth overridden
MODELS = {"l": ("rev_vit_l", {}), "h": ("rev_vit_h", {})}
SMOKE_MODELS = {"l": ("rev_vit_l", dict(embed_dim=64, depth=4, num_heads=2)),
                "h": ("rev_vit_h", dict(embed_dim=96, depth=6, num_heads=2))}
# the depth sweep: Rev-ViT at a fixed width narrower than L's (2 busy cores: at 224x224 a
# 1024-wide sweep of sharded processes takes too long), depth overridden
DEPTH_MODEL = ("rev_vit_l", dict(embed_dim=512, num_heads=8))
SMOKE_DEPTH_MODEL = ("rev_vit_l", dict(embed_dim=64, num_heads=2))
MODES = {"reversible": dict(use_rev_backprop=True), "plain": dict(use_rev_backprop=False)}


def param_formula(embed_dim, depth, mlp_ratio=4.0, patch=16, img=224, num_classes=1000):
    """RevViT's parameter count by hand: per block two LayerNorms (2 x 2C), qkv and proj
    (4C² + 4C), fc1 and fc2 (2hC² + hC + C); outside the blocks the patch convolution
    (3p²C + C), the position embedding (tokens x C), the fused norm over 2C and the head."""
    c, hidden = embed_dim, int(embed_dim * mlp_ratio)
    block = 4 * c + (4 * c * c + 4 * c) + (2 * c * hidden + hidden + c)
    stem = 3 * patch * patch * c + c + (img // patch) ** 2 * c
    head = 2 * (2 * c) + 2 * c * num_classes + num_classes
    return depth * block + stem + head


# --------------------------------------------------------------------------------------------
# child: one process of one configuration
# --------------------------------------------------------------------------------------------

def _init_weights(model, seed):
    """Random weights in place on each process's local shard (values are irrelevant here; no
    NaN: LayerNorm weights 1, biases 0, matrices N(0, 0.02))."""
    import torch
    from torch.distributed.tensor import DTensor

    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.to_local() if isinstance(p, DTensor) else p
            if t.ndim >= 2:
                t.normal_(0.0, 0.02, generator=g)
            else:
                t.fill_(1.0 if name.endswith("weight") else 0.0)


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def run_child(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import datetime

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    import revvit_d2

    after_import = maxrss_kib()
    cuda = args.device == "cuda"
    device = torch.device("cuda", args.rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = None
    if args.world > 1:
        dist.init_process_group("nccl" if cuda else "gloo",
                                init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.world,
                                timeout=datetime.timedelta(seconds=args.pg_timeout))
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (args.world,))
    after_pg = maxrss_kib()
    alloc_before = torch.cuda.memory_allocated(device) if cuda else None

    kwargs = dict(json.loads(args.model_kwargs), **MODES[args.mode])
    if args.img_size != 224:
        kwargs["img_size"] = args.img_size
    with torch.device("meta"):
        model = revvit_d2.create_model(args.variant, **kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    if args.world > 1:
        revvit_d2.shard_model(model, mesh=mesh)
    model.to_empty(device=device)
    _init_weights(model, seed=args.rank)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(100 + args.rank)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (args.batch,), generator=g).to(device)
    after_build = maxrss_kib()

    peaks, times, losses = [], [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        peaks.append(maxrss_kib())
    states = dict(
        params=sum(_local_bytes(p) for p in model.parameters()),
        grads=sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
        optimizer=sum(_local_bytes(v) for st in opt.state.values() for v in st.values()
                      if torch.is_tensor(v)),
    )
    out = dict(
        variant=args.variant, model_kwargs=kwargs, mode=args.mode, world=args.world,
        rank=args.rank, batch=args.batch, img_size=args.img_size, device=args.device,
        n_params=n_params, local_param_numel=sum(p.numel() for p in (
            (q.to_local() if hasattr(q, "to_local") else q) for q in model.parameters())),
        state_bytes=states, state_bytes_total=sum(states.values()),
        threads=torch.get_num_threads(), losses=losses, step_seconds=times,
        malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        maxrss_kib_after_import=after_import, maxrss_kib_after_process_group=after_pg,
        maxrss_kib_after_build=after_build, maxrss_kib_after_step=peaks,
    )
    if cuda:  # the allocator's view: the numbers that matter on a GPU
        out.update(gpu=torch.cuda.get_device_name(device),
                   baseline_mib=alloc_before / MIB,
                   peak_mib=torch.cuda.max_memory_allocated(device) / MIB,
                   peak_reserved_mib=torch.cuda.max_memory_reserved(device) / MIB)
    else:
        out.update(baseline_mib=after_import / 1024, baseline_pg_mib=after_pg / 1024,
                   peak_mib=peaks[-1] / 1024)
    if args.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


# --------------------------------------------------------------------------------------------
# parent: orchestration and reports
# --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_world(args, variant, kwargs, mode, world, img_size, batch):
    """Start ``world`` fresh processes for one configuration; their results, rank order."""
    port = _free_port()
    base = [sys.executable, str(Path(__file__).resolve()), "--child", "--device", args.device,
            "--variant", variant, "--model-kwargs", json.dumps(kwargs), "--mode", mode,
            "--world", str(world), "--port", str(port), "--img-size", str(img_size),
            "--batch", str(batch), "--threads", str(args.threads), "--steps", str(args.steps),
            "--pg-timeout", str(args.pg_timeout)]
    tag = f"{variant} {kwargs} {mode} N={world}"
    with ThreadPoolExecutor(max_workers=world) as pool:
        return list(pool.map(
            lambda r: measure_in_child(base + ["--rank", str(r)], args.threads, "fsdp_memory",
                                       f"{tag} rank {r}"), range(world)))


def summarize(ranks) -> dict:
    """One configuration's row: the largest rank (memory is what must fit on every device)."""
    r0 = ranks[0]
    kinds = ("params", "grads", "optimizer")
    row = dict(variant=r0["variant"], model_kwargs=r0["model_kwargs"], mode=r0["mode"],
               world=r0["world"], n_params=r0["n_params"],
               depth=r0["model_kwargs"].get("depth"),
               states_mib=max(r["state_bytes_total"] for r in ranks) / MIB,
               states_mib_sum=sum(r["state_bytes_total"] for r in ranks) / MIB,
               states_by_kind_mib={k: max(r["state_bytes"][k] for r in ranks) / MIB
                                   for k in kinds},
               baseline_mib=max(r["baseline_mib"] for r in ranks),
               peak_mib=max(r["peak_mib"] for r in ranks),
               peak_mib_by_rank=[r["peak_mib"] for r in ranks],
               step_seconds=max(r["step_seconds"][-1] for r in ranks),
               losses_finite=all(v == v and abs(v) != float("inf")
                                 for r in ranks for v in r["losses"]))
    if "baseline_pg_mib" in r0:
        row["baseline_pg_mib"] = max(r["baseline_pg_mib"] for r in ranks)
    if "peak_reserved_mib" in r0:
        row["peak_reserved_mib"] = max(r["peak_reserved_mib"] for r in ranks)
    row["above_baseline_mib"] = row["peak_mib"] - row["baseline_mib"]
    row["working_mib"] = max(r["peak_mib"] - r["baseline_mib"] - r["state_bytes_total"] / MIB
                             for r in ranks)
    return row


def add_ratios(rows):
    """Each row's states and peak above baseline relative to the same model's N = 1 row."""
    key = (lambda r: (r.get("table"), r["variant"], r["mode"], r["depth"]))
    ones = {key(r): r for r in rows if r["world"] == 1}
    for r in rows:
        one = ones.get(key(r))
        r["states_ratio"] = r["states_mib"] / one["states_mib"] if one else None
        r["above_baseline_ratio"] = (r["above_baseline_mib"] / one["above_baseline_mib"]
                                     if one else None)


def _line(r) -> str:
    ratio = (f"  states x{r['states_ratio']:.3f}, above baseline x{r['above_baseline_ratio']:.3f}"
             f" of N=1" if r.get("states_ratio") is not None and r["world"] > 1 else "")
    depth = f" depth {r['depth']:3d}" if r["depth"] is not None else ""
    return (f"{r['variant']:10s}{depth} {r['mode']:10s} N={r['world']}: states "
            f"{r['states_mib']:9.1f} MiB, baseline {r['baseline_mib']:7.1f}, peak "
            f"{r['peak_mib']:9.1f}, working {r['working_mib']:8.1f}  (step "
            f"{r['step_seconds']:.1f} s){ratio}")


def parameter_checks(models):
    """Each main model's parameter count (registered configuration, 224x224, 1000 classes) on
    the meta device against :func:`param_formula`."""
    import torch

    import revvit_d2
    from revvit_d2.modeling import get_model_kwargs

    checks = []
    for variant, overrides in models.values():
        with torch.device("meta"):
            model = revvit_d2.create_model(variant, **overrides)
        kw = dict(get_model_kwargs(variant), **overrides)
        formula = param_formula(kw["embed_dim"], kw["depth"], kw.get("mlp_ratio", 4.0),
                                model.patch_size, 224, model.num_classes)
        checks.append(dict(variant=variant, overrides=overrides,
                           counted=sum(p.numel() for p in model.parameters()), formula=formula))
    return checks


def merge(outs):
    """One report from runs that measured different parts (e.g. the process-count table and the
    depth sweep, run side by side): rows and raw records concatenated, the depth settings from
    the run that has depth rows, both commands kept."""
    out = outs[0]
    for other in outs[1:]:
        out["rows"] = out["rows"] + other["rows"]
        out["raw"] = out["raw"] + other["raw"]
        if any(r["table"] == "depth" for r in other["rows"]):
            out["settings"].update({k: v for k, v in other["settings"].items()
                                    if k.startswith("depth")})
        if any(r["table"] == "worlds" for r in other["rows"]):
            out["settings"].update(models=other["settings"]["models"],
                                   worlds=other["settings"]["worlds"])
        out["command"] = f"{out['command']}` and `{other['command']}"
        out["settings"]["wall_seconds"] = max(out["settings"]["wall_seconds"],
                                              other["settings"]["wall_seconds"])
        out["partial"] = bool(out.get("partial") or other.get("partial"))
    return out


def write_reports(out, out_path, quiet):
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path + ".json").write_text(json.dumps(out, indent=1) + "\n")
    Path(out_path + ".md").write_text(markdown(out))
    plot(out, out_path + ".png")
    if not quiet:
        print(Path(out_path + ".md").read_text())


def run_parent(args, argv):
    if args.from_json:  # redraw the markdown and the plot of (finished or killed) runs
        out = merge([json.loads(Path(p).read_text()) for p in args.from_json])
        if out.get("machine") is None:  # a killed run's JSON: its rows so far
            out["machine"] = dict(machine_info(), load_average_1min_at_start=out["settings"].get(
                "load_average_1min_at_start"), threads_per_process=out["settings"]["threads"])
            out["parameter_checks"] = parameter_checks(
                {k: tuple(v) for k, v in out["settings"]["models"].items()})
        write_reports(out, args.out or str(Path(args.from_json[0]).with_suffix("")), args.quiet)
        return 0
    if args.device == "cpu" and "torch" in sys.modules:
        raise RuntimeError("fsdp_memory: children must start before torch is imported")
    worlds = sorted(set(args.worlds))
    depth_world = args.depth_world
    skipped = []
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            sys.exit("fsdp_memory: --device cuda but no CUDA device is visible")
        skipped = [n for n in worlds if n > gpus]
        worlds = [n for n in worlds if n <= gpus]
        depth_world = min(depth_world, gpus)
        if skipped:
            print(f"fsdp_memory: {gpus} GPU(s): N = {', '.join(map(str, skipped))} skipped "
                  f"(one process per GPU)", flush=True)
    models = {k: (SMOKE_MODELS if args.smoke else MODELS)[k] for k in args.models}
    load_start = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    raw, rows = [], []
    out_path = args.out or str(ROOT / "docs" / "results" / (
        "fsdp_memory_gpu" if args.device == "cuda" else "fsdp_memory_cpu"))
    settings = dict(device=args.device, smoke=args.smoke, models={k: list(v) for k, v in
                                                                   models.items()},
                    worlds=worlds, worlds_skipped=skipped, img_size=args.img_size,
                    batch_per_process=args.batch, steps=args.steps, threads=args.threads,
                    depths=sorted(set(args.depths)), depth_modes=list(args.depth_modes),
                    depth_model=list(SMOKE_DEPTH_MODEL if args.smoke else DEPTH_MODEL),
                    depth_world=depth_world, depth_img_size=args.depth_img_size,
                    depth_batch_per_process=args.depth_batch, optimizer="AdamW",
                    env=MALLOC_ENV if args.device == "cpu" else {},
                    json_name=Path(out_path + ".json").name)
    command = command_line(__file__, argv)

    def partial():  # the JSON so far, after every configuration (a killed run keeps its rows;
        # --from-json draws them); no torch in this process while children are measured
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(out_path + ".json.tmp")
        tmp.write_text(json.dumps(dict(machine=None, settings=dict(
            settings, wall_seconds=time.perf_counter() - t0, load_average_1min_at_start=load_start),
            command=command, parameter_checks=[], rows=rows, raw=raw, partial=True),
            indent=1) + "\n")
        os.replace(tmp, out_path + ".json")

    for key, (variant, overrides) in models.items():
        for world in worlds:
            ranks = measure_world(args, variant, overrides, "reversible", world, args.img_size,
                                  args.batch)
            raw += ranks
            rows.append(dict(summarize(ranks), table="worlds", model=key))
            add_ratios(rows)
            partial()
            if not args.quiet:
                print(_line(rows[-1]), flush=True)
    depth_variant, depth_base = SMOKE_DEPTH_MODEL if args.smoke else DEPTH_MODEL
    for mode in args.depth_modes:
        for depth in sorted(set(args.depths)):
            kw = dict(depth_base, depth=depth)
            ranks = measure_world(args, depth_variant, kw, mode, depth_world,
                                  args.depth_img_size, args.depth_batch)
            raw += ranks
            rows.append(dict(summarize(ranks), table="depth", model="depth"))
            partial()
            if not args.quiet:
                print(_line(rows[-1]), flush=True)
    add_ratios(rows)
    wall = time.perf_counter() - t0
    checks = parameter_checks(models)
    for c in checks:
        print(f"{c['variant']} parameters: {c['counted']:,} counted, {c['formula']:,} by the "
              f"formula ({'equal' if c['counted'] == c['formula'] else 'DIFFERENT'})", flush=True)
    info = machine_info()
    info["load_average_1min_at_start"] = load_start
    info["threads_per_process"] = args.threads
    if args.device == "cuda":
        info["gpu"] = raw[0]["gpu"]
        info["gpus"] = gpus
    settings["wall_seconds"] = wall
    out = dict(machine=info, settings=settings, command=command, parameter_checks=checks,
               rows=rows, raw=raw)
    write_reports(out, out_path, args.quiet)
    return 0


def _where(out):
    m, s = out["machine"], out["settings"]
    if s["device"] == "cuda":
        return f"GPU {m['gpu']}", "`torch.cuda.max_memory_allocated`"
    return "CPU", "peak RSS"


def markdown(out):
    s, m = out["settings"], out["machine"]
    where, what = _where(out)
    cpu = s["device"] == "cpu"
    base = ("baseline: RSS with torch and revvit_d2 imported, nothing built" if cpu else
            "baseline: allocated before the model is built")
    lines = [f"# Sharded (FSDP2) reversible training: memory per process ({where})", "",
             f"Rev-ViT trained with AdamW, {s['steps']} step(s), each process its own batch of "
             f"{s['batch_per_process']} at {s['img_size']}x{s['img_size']}, fp32; N = 1 "
             f"unsharded, N > 1 `revvit_d2.shard_model` ({'gloo' if cpu else 'NCCL'}), one "
             f"fresh process per rank. **states** = parameters + gradients + AdamW state, "
             f"computed from each process's local shards (numel x bytes); **peak** = {what}; "
             f"{base}; **working** = peak - baseline - states (activations, gathered blocks, a "
             f"branch's full gradients before their reduce-scatter, buffers). Largest rank "
             f"shown (FSDP2 shards dim 0, so a 1-row tensor such as the position embedding "
             f"sits on one rank). MiB per process:", "",
             "| model | params | N | states | states / N=1 | baseline | peak | peak - baseline "
             "| / N=1 | working |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        if r["table"] != "worlds":
            continue
        ratio = (lambda v: f"{v:.3f}" if v is not None else "")
        lines.append(
            f"| `{r['variant']}` | {r['n_params'] / 1e6:.1f}M | {r['world']} | "
            f"{r['states_mib']:.1f} | {ratio(r['states_ratio'])} | {r['baseline_mib']:.1f} | "
            f"{r['peak_mib']:.1f} | {r['above_baseline_mib']:.1f} | "
            f"{ratio(r['above_baseline_ratio'])} | {r['working_mib']:.1f} |")
    depth_rows = [r for r in out["rows"] if r["table"] == "depth"]
    if depth_rows:
        kw = depth_rows[0]["model_kwargs"]
        lines += ["", f"Depth sweep: Rev-ViT width {kw.get('embed_dim')}, {kw.get('num_heads')} "
                      f"heads (`{depth_rows[0]['variant']}` with width and depth overridden), "
                      f"N = {s['depth_world']}, batch {s['depth_batch_per_process']} per process "
                      f"at {s['depth_img_size']}x{s['depth_img_size']}; the reversible engine"
                      + (f" against the same {'sharded ' if s['depth_world'] > 1 else ''}model "
                         f"with plain autograd (`use_rev_backprop=False`)"
                         if "plain" in s["depth_modes"] else "") + ". MiB per process:", "",
                  "| depth | mode | states | peak | working |", "|---:|---|---:|---:|---:|"]
        for r in depth_rows:
            lines.append(f"| {r['depth']} | {r['mode']} | {r['states_mib']:.1f} | "
                         f"{r['peak_mib']:.1f} | {r['working_mib']:.1f} |")
        for mode in s["depth_modes"]:
            rs = [r for r in depth_rows if r["mode"] == mode]
            if len(rs) >= 2:
                d0, d1 = rs[0], rs[-1]
                per = (d1["working_mib"] - d0["working_mib"]) / (d1["depth"] - d0["depth"])
                lines.append(f"\n{mode}: working memory {d0['working_mib']:.1f} MiB at "
                             f"{d0['depth']} blocks, {d1['working_mib']:.1f} at {d1['depth']} "
                             f"({per:+.2f} MiB per block).")
    lines += [""] + [f"`{c['variant']}` parameters: {c['counted']:,} counted, {c['formula']:,} "
                     f"by the formula (224x224, 1000 classes)." for c in out["parameter_checks"]]
    if s["worlds_skipped"]:
        lines.append(f"\nN = {', '.join(map(str, s['worlds_skipped']))} not measured: "
                     f"{m.get('gpus')} GPU(s), one process per GPU.")
    mem = f"{m['mem_total_gib']} GiB, " if m.get("mem_total_gib") else ""
    lines += ["", measured_on(m, out["command"], s["wall_seconds"],
                              f"{mem}{s['threads']} torch thread(s) per process",
                              s["json_name"], "" if cpu else where), ""]
    return "\n".join(lines)


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where, what = _where(out)
    depth_rows = [r for r in out["rows"] if r["table"] == "depth"]
    fig, axes = plt.subplots(1, 2 if depth_rows else 1, figsize=(11 if depth_rows else 6, 4.2),
                             squeeze=False)
    ax = axes[0][0]
    for key in dict.fromkeys(r["model"] for r in out["rows"] if r["table"] == "worlds"):
        rows = [r for r in out["rows"] if r["table"] == "worlds" and r["model"] == key]
        ns = [r["world"] for r in rows]
        line, = ax.plot(ns, [r["above_baseline_mib"] / 1024 for r in rows], "o-",
                        label=f"{rows[0]['variant']}: peak - baseline")
        ax.plot(ns, [r["states_mib"] / 1024 for r in rows], "s--", color=line.get_color(),
                label=f"{rows[0]['variant']}: states (computed)")
        one = [r for r in rows if r["world"] == 1]
        if one:
            ax.plot(ns, [one[0]["states_mib"] / 1024 / n for n in ns], ":", color="gray", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["world"] for r in out["rows"] if r["table"] == "worlds"}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("processes N (dotted: N=1 states / N)")
    ax.set_ylabel(f"GiB per process ({what.strip('`')})")
    ax.set_title(f"Per-process memory, sharded training ({where})", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if depth_rows:
        ax = axes[0][1]
        for mode in out["settings"]["depth_modes"]:
            rs = [r for r in depth_rows if r["mode"] == mode]
            ax.plot([r["depth"] for r in rs], [r["working_mib"] for r in rs], "o-",
                    label=f"{mode}: working")
        rs = [r for r in depth_rows if r["mode"] == out["settings"]["depth_modes"][0]]
        ax.plot([r["depth"] for r in rs], [r["states_mib"] for r in rs], "s--", color="gray",
                label="states (computed)")
        ax.set_xticks([r["depth"] for r in rs])
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("MiB per process")
        ax.set_title(f"N = {out['settings']['depth_world']}: working memory vs depth",
                     fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS),
                   help="l: rev_vit_l, h: rev_vit_h (not official)")
    p.add_argument("--worlds", type=int, nargs="*", default=None,
                   help="process counts (default 1 2 4; smoke 1 2; cuda: those up to the "
                        "number of GPUs; none: only the depth sweep)")
    p.add_argument("--img-size", type=int, default=None,
                   help="default 64 on the CPU (states dominate; keeps Rev-ViT-H quick), 224 "
                        "on CUDA")
    p.add_argument("--batch", type=int, default=None, help="per process; default 2 (CPU), 8")
    p.add_argument("--depths", type=int, nargs="*", default=None,
                   help="depth sweep at Rev-ViT-L's width (default 8 16 24; none: no sweep)")
    p.add_argument("--depth-modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    p.add_argument("--depth-world", type=int, default=2)
    p.add_argument("--depth-img-size", type=int, default=None, help="default 224")
    p.add_argument("--depth-batch", type=int, default=None, help="default 2 (CPU), 8")
    p.add_argument("--steps", type=int, default=2, help="training steps per process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--pg-timeout", type=int, default=900,
                   help="seconds before a collective waiting for a dead rank gives up")
    p.add_argument("--smoke", action="store_true",
                   help="tiny widths (64 and 96 wide, 4 and 6 blocks, 32x32, N = 1 2, depths "
                        "2 4)")
    p.add_argument("--out", default=None, help="OUT.{md,json,png}; default "
                   "docs/results/fsdp_memory_cpu (or _gpu)")
    p.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="only rewrite the markdown and plot from the JSON of a run (several: "
                        "merged)")
    p.add_argument("--quiet", action="store_true")
    # child-only arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="rev_vit_l", help=argparse.SUPPRESS)
    p.add_argument("--model-kwargs", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="reversible", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    if args.smoke:
        args.img_size = args.img_size or 32
        args.depth_img_size = args.depth_img_size or 32
        if args.depths is None:
            args.depths = [2, 4]
        args.worlds = [1, 2] if args.worlds is None else args.worlds
    args.worlds = [1, 2, 4] if args.worlds is None else args.worlds
    args.img_size = args.img_size or (64 if cpu else 224)
    args.batch = args.batch or (2 if cpu else 8)
    args.depths = [8, 16, 24] if args.depths is None else args.depths
    args.depth_img_size = args.depth_img_size or 224
    args.depth_batch = args.depth_batch or (2 if cpu else 8)
    if min(args.worlds, default=1) < 1 or args.depth_world < 1:
        p.error("process counts must be >= 1")
    return args


def main(argv=None):
    return dispatch(argv, parse_args, run_child, run_parent)


if __name__ == "__main__":
    sys.exit(main())
