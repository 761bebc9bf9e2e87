"""The ``addnorm`` command: ``info`` (versions, backends, CPU, GPU), ``build`` (the C++
eager path), ``bench`` and ``lab``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_flags() -> str:
    """The SIMD extensions the kernels can use, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def info(console: Console) -> None:
    import torch

    import addnorm

    table = Table(title="addnorm info", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("addnorm", addnorm.__version__)
    table.add_row("python", sys.version.split()[0])
    table.add_row("torch", torch.__version__)
    for package in ("numba", "triton"):
        table.add_row(package, _version(package))
    backends = addnorm.backends()
    table.add_row(
        "backends", "  ".join(f"{n}: {'yes' if ok else 'no'}" for n, ok in backends.items())
    )
    table.add_row(
        "default backend",
        f"cpu: {addnorm._backend.select(torch.device('cpu'))}"
        + (f", cuda: {addnorm._backend.select(torch.device('cuda'))}" if torch.cuda.is_available() else ""),
    )
    from .bench import cpu_model  # the same name the bench's header prints

    table.add_row("cpu", f"{cpu_model()} ({platform.machine()})")
    table.add_row("cpu cores", f"{os.cpu_count()} (torch threads: {torch.get_num_threads()})")
    table.add_row("cpu features", _cpu_flags())
    from .kernels import cpp

    table.add_row("C++ eager path", cpp.status())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            table.add_row(f"gpu {i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB")
    else:
        table.add_row("gpu", "none")
    console.print(table)


def build_cpp(verbose: bool) -> int:
    """``addnorm build``: the C++ eager path, built where missing; 1 where it cannot be."""
    import time

    from .kernels import cpp

    if cpp.built() is not None:
        cpp.compile_kernels()  # the numba kernels it calls: in numba's cache, or compiled anew
        print(f"addnorm: the C++ eager path is built: {cpp.built()}")
        return 0
    print("addnorm: building the C++ eager path (the extension and the numba kernels it calls; "
          "~1-2 min once) ...", flush=True)
    start = time.perf_counter()
    try:
        path = cpp.build(verbose)
    except Exception as e:  # the compiler's or ninja's: say it, and that addnorm works without it
        print(f"addnorm: the build failed ({type(e).__name__}: {e}); every call takes the Python "
              "path (the same kernels, slower at small sizes)", file=sys.stderr)
        return 1
    print(f"addnorm: built {path} in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="addnorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends, CPU features, GPU if any")
    build = sub.add_parser("build", help="compile the C++ eager path of small DyT, ScaleNorm and RMSNorm calls "
                           "(a C++ compiler and ninja; ~1-2 min once, then nothing)")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    bench = sub.add_parser("bench", help="addnorm vs torch eager vs torch.compile, same process")
    bench.add_argument("--quick", action="store_true", help="one shape per op, fewer rounds")
    bench.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    bench.add_argument("--rounds", type=int, default=None, help="timed rounds per contender")
    bench.add_argument("--ops", default="", help="comma-separated ops to run (default: all), "
                       "e.g. rms_norm,batch_norm_train")
    bench.add_argument("--out", type=Path, default=Path("bench-out"),
                       help="folder for bench.json and bench.md (default: bench-out)")
    bench.add_argument("--sweep", action="store_true",
                       help="every shape models use (rows 1..65536 x hidden 64..16384, CNN and "
                       "UNet channel shapes), float32/bfloat16/float16, no_grad forward, "
                       "forward with grad and forward+backward, per-call time against torch "
                       "eager; --quick: a subset; writes sweep.json and sweep.md")
    bench.add_argument("--device", default="cpu",
                       help="cpu (default) or cuda: on cuda the row norms' Triton kernels against "
                       "torch eager, torch.compile, Liger-Kernel and quack (where installed), "
                       "rows 16384 x hidden 1024..8192 and one decoding row, with the fraction "
                       "of the GPU's peak bandwidth; writes gpu.json and gpu.md")
    bench.add_argument("--model", action="store_true",
                       help="whole models with torch.nn's norms and with addnorm's: a "
                       "nanoGPT-style training step, Llama-style prefill and decode, a "
                       "UNet-style GroupNorm stack; eager and compiled; --quick: small "
                       "models; writes model.json and model.md")
    lab = sub.add_parser("lab", help="answer the seed articles' claims with measurements; "
                         "writes runs.jsonl, claims.json and report.html (resumable)")
    lab.add_argument("--quick", action="store_true", help="small models, few runs (minutes)")
    lab.add_argument("--out", type=Path, default=Path("lab-out"), help="results folder (default: lab-out)")
    lab.add_argument("--claims", default="", help="comma-separated claim numbers (default: all)")
    lab.add_argument("--seeds", type=int, default=None, help="seeds per setting (quick 2, full 3)")
    lab.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                     help="training runs in parallel processes, one thread each (default: one per core); "
                          "timed runs always run alone afterwards")
    args = parser.parse_args(argv)
    # rich sizes tables to the terminal; logs and pipes get room for the bench's columns
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if args.command == "info":
        info(console)
    elif args.command == "build":
        return build_cpp(args.verbose)
    elif args.command == "lab":
        from . import lab as L

        try:
            claims = [int(c) for c in args.claims.split(",") if c.strip()] or None
            L.run(args.out, "quick" if args.quick else "full", claims=claims, seeds=args.seeds, workers=args.workers,
                  console=console)
        except ValueError as e:
            parser.error(str(e))
    elif args.command == "bench":
        from . import bench as B

        console.print(B.header(), highlight=False)
        ops = {o for o in args.ops.split(",") if o} or None
        if args.device != "cpu":
            import torch

            from . import bench_gpu as G

            if torch.device(args.device).type != "cuda":
                parser.error(f"--device must be cpu or a CUDA device, got {args.device!r}")
            try:
                results = G.run(args.device, compile=not args.no_compile, rounds=args.rounds or 20,
                                console=console)
            except RuntimeError as e:
                parser.error(str(e))
            name = G.device_name(torch.device(args.device))
            md = G.markdown(results, name)
            console.print(md, highlight=False)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu.json").write_text(json.dumps(
                {"meta": B.header(), "device": name, "results": [dataclasses.asdict(r) for r in results]}, indent=1))
            (args.out / "gpu.md").write_text(f"{B.header()}\n\n{md}")
            console.print(f"saved {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")
            return 0
        if args.model:
            from . import bench_model as M

            results = M.run(quick=args.quick, compile=not args.no_compile, rounds=args.rounds,
                            console=console)
            console.print(M.table(results))
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "model.json").write_text(json.dumps(
                {"meta": B.header(), "results": [dataclasses.asdict(r) for r in results]}, indent=1))
            (args.out / "model.md").write_text(f"{B.header()}\n\n{M.markdown(results)}")
            console.print(f"saved {args.out / 'model.json'} and {args.out / 'model.md'}")
            return 0
        if args.sweep:
            results = B.sweep(quick=args.quick, ops=ops, rounds=args.rounds, console=console)
            console.print(B.sweep_table(results))
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "sweep.json").write_text(json.dumps(
                {"meta": B.header(), "summary": B.sweep_summary(results),
                 "results": [dataclasses.asdict(r) for r in results]}, indent=1))
            (args.out / "sweep.md").write_text(f"{B.header()}\n\n{B.sweep_markdown(results)}")
            console.print(f"saved {args.out / 'sweep.json'} and {args.out / 'sweep.md'}")
            return 0
        results = B.run(quick=args.quick, compile=not args.no_compile, rounds=args.rounds,
                        console=console, ops=ops)
        console.print(B.table(results))
        prealloc = B.preallocated() if B._backend_name() == "numba" else []
        if prealloc:
            console.print(B.preallocated_table(prealloc))
        B.save(results, args.out, prealloc)
        console.print(f"saved {args.out / 'bench.json'} and {args.out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
