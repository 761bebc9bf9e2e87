"""``addnorm.patch`` on every causal-LM family of the installed transformers.

    python benchmarks/patch_families.py [--families llama,olmo,...] [--timeout 60]

Each family's model is built from its config with small sizes where the config takes
them (hidden 64, 2 layers, 4 heads, vocabulary 128; random weights, no download), its
one-dimensional parameters moved away from their initial values, and run in float32
eval mode on a (2, 12) batch of token ids, before and after ``addnorm.patch``.  One
line per family: how many norms were swapped, the largest difference of the logits, and
the norm classes left alone with the reason.  A family runs in a process of its own
(a model whose config ignores the small sizes can take gigabytes), so one that does not
build or run on a CPU from a small config is listed as skipped, with the error.
Needs ``transformers`` (the test extra); ~20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import warnings

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, head_dim=16, n_embd=64, n_layer=2, n_head=4,
             d_model=64, num_layers=2, num_heads=4, moe_intermediate_size=32, num_experts=4, n_routed_experts=4,
             num_local_experts=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=16, pad_token_id=0)


def families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def one(name: str) -> str:
    """The family's line (run in the child process)."""
    warnings.filterwarnings("ignore")
    import torch
    import transformers as T
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import addnorm

    T.logging.set_verbosity_error()
    try:
        config_class = type(T.AutoConfig.for_model(name))
        defaults = config_class()
        config = config_class(**{k: v for k, v in SMALL.items() if hasattr(defaults, k)})
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name]
        torch.manual_seed(0)
        model = getattr(T, model_class if isinstance(model_class, str) else model_class[0])(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:  # norm weights away from 1 and biases from 0
                    p.add_(torch.randn_like(p) * 0.3)
        ids = torch.randint(1, 100, (2, 12))
        with torch.no_grad():
            before = model(ids).logits
        report = io.StringIO()
        with contextlib.redirect_stdout(report):
            swapped = addnorm.patch(model, verbose=True)
        with torch.no_grad():
            after = model(ids).logits
    except Exception as e:  # noqa: BLE001  (a family that does not build or run here)
        return f"{name:24s} skipped: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    left = [line.removeprefix("addnorm.patch: ") for line in report.getvalue().splitlines() if " alone: " in line]
    diff = (after.double() - before.double()).abs().max().item()
    return f"{name:24s} swapped {swapped:3d}  logits differ by {diff:.3g}" + "".join(f"\n    {line}" for line in left)


def _limit_memory() -> None:
    """A child's address space capped (6 GB): a model too big for the machine fails to
    allocate, and is listed as skipped, instead of drawing the kernel's OOM killer."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated family names (default: all)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per family")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child's entry
    args = parser.parse_args()
    if args.one:
        print(one(args.one))
        return
    names = args.families.split(",") if args.families else families()
    counts = {"built": 0, "swapped": 0, "identical": 0}
    for name in names:
        try:
            out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                 timeout=args.timeout, preexec_fn=_limit_memory).stdout.strip()
        except subprocess.TimeoutExpired:
            out = ""
        if not out.startswith(name):
            out = f"{name:24s} skipped: no result within {args.timeout} s (or the process died)"
        elif " swapped " in out:
            counts["built"] += 1
            counts["swapped"] += " swapped   0 " not in out
            counts["identical"] += "logits differ by 0\n" in out + "\n"
        print(out, flush=True)
    print(f"{len(names)} families: {counts['built']} built and ran, norms swapped in {counts['swapped']}, "
          f"logits identical in {counts['identical']}")


if __name__ == "__main__":
    main()
