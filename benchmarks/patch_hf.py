"""Forward time of Hugging Face models before and after ``addnorm.patch``.

    python benchmarks/patch_hf.py [--rounds 7]

Two architectures at the sizes people run on a CPU, built from configs with random
weights (no download): a Llama (SmolLM2-135M's shape: RMSNorm) and GPT-2 small
(LayerNorm).  Each is timed twice in one process, interleaved round by round: as built,
and a deep copy patched with ``addnorm.patch``.  Per model and dtype: a 256-token
prefill (one forward) and greedy generation of 32 tokens after a 32-token prompt
(decoding, one token per forward).  Ratios are the original's time over the patched
one's: above 1, patching made it faster.  Needs ``transformers`` (the test extra).
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch
import transformers as T

import addnorm
from addnorm.bench import _time_rounds

T.logging.set_verbosity_error()

MODELS = {
    "Llama (SmolLM2-135M shape)": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)),
    "GPT-2 small": lambda: T.GPT2LMHeadModel(T.GPT2Config()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| model | dtype | norms swapped | prefill 256 (ms) | ratio | generate 32 (ms) | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, build in MODELS.items():
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            original = build().to(dtype).eval()
            patched = copy.deepcopy(original)
            swapped = addnorm.patch(patched)
            prefill = torch.randint(0, 1000, (1, 256))
            prompt = prefill[:, :32]
            kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
            with torch.inference_mode():
                assert torch.equal(original.generate(prompt, **kw), patched.generate(prompt, **kw))
                f = _time_rounds({"torch": lambda: original(prefill), "addnorm": lambda: patched(prefill)}, args.rounds)
                g = _time_rounds({"torch": lambda: original.generate(prompt, **kw),
                                  "addnorm": lambda: patched.generate(prompt, **kw)}, max(3, args.rounds // 2))
            print(f"| {name} | {str(dtype).removeprefix('torch.')} | {swapped} | {f['torch']:.1f} / {f['addnorm']:.1f} | "
                  f"{f['torch'] / f['addnorm']:.2f}x | {g['torch']:.0f} / {g['addnorm']:.0f} | "
                  f"{g['torch'] / g['addnorm']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
