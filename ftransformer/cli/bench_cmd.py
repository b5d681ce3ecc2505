"""``ftransformer bench train | generate | quality | load | interp | ...``: speed and training-quality benchmarks against baselines.

Each benchmark lives in ``ftransformer.bench.<name>`` with ``add_arguments(parser)`` and ``run(args)``;
its module is imported when that benchmark is parsed, not when this one is.
"""

from ftransformer.cli import add_commands

# benchmark name -> (module, one-line help)
BENCHES = {
    "train": ("ftransformer.bench.train", "time one training step: functional model vs a plain torch.nn GPT"),
    "generate": ("ftransformer.bench.generate", "time generation against baselines"),
    "speculative": ("ftransformer.bench.speculative", "speculative decoding with a draft model: acceptance and speed-up"),
    "int8": ("ftransformer.bench.int8", "what int8 quantization costs a trained checkpoint: val loss and greedy agreement"),
    "vmap": ("ftransformer.bench.vmap", "per-example gradients (vmap vs a loop vs Opacus) and an ensemble in one vmapped step"),
    "quality": ("ftransformer.bench.quality", "train the shakespeare-char-cpu recipe: functional vs torch.nn, same batches"),
    "patching": ("ftransformer.bench.patching", "an activation-patching sweep: patch_sweep vs a vmap of full runs vs a loop of single patches"),
    "edges": ("ftransformer.bench.edges", "edge attribution: EAP and EAP-IG vs exact edge patching (one vmap per layer) vs a loop of circuits"),
    "interp": ("ftransformer.bench.interp", "interpretability sweeps (head ablation, patching, attribution) vs TransformerLens' loops"),
    "das": ("ftransformer.bench.das", "a (layer x position) DAS sweep in one vmapped step vs pyvene, one hypothesis at a time"),
    "sae": ("ftransformer.bench.sae", "a stack of SAEs in one vmapped step vs the same SAEs one by one"),
    "gpu": ("ftransformer.bench.gpu", "train tokens/s and MFU, decode tokens/s, peak memory: bf16 + compile + CUDA graphs vs nanoGPT"),
    "influence": ("ftransformer.bench.influence", "EK-FAC influence (factors, pairwise scores) vs kronfluence on the same tiny Llama"),
    "steering": ("ftransformer.bench.steering", "a steering vector while decoding: tok/s against plain, eager and compiled, and nnsight's"),
    "finetune": ("ftransformer.bench.finetune", "full fine-tuning, LoRA, DoRA: ours vs transformers + AdamW and PEFT, step time and peak RSS"),
    "load": ("ftransformer.bench.load", "load a Hugging Face checkpoint: ft.load_hf vs transformers, time and peak memory"),
}


def add_arguments(parser) -> None:
    add_commands(parser, BENCHES, dest="bench", metavar="BENCH", run_attr="_bench_run")


def run(args) -> int:
    return int(args._bench_run(args) or 0)
