"""``ftransformer finetune`` on a tiny random Hugging Face Llama with a ChatML tokenizer: the loss falls, the run
resumes exactly, the adapter comes out in PEFT's format, and ``generate --adapter RUN --chat`` talks with it."""

import json

import pytest
import torch

from ftransformer import tree
from ftransformer.checkpoint import load_tree, read_checkpoint_info
from ftransformer.cli import main
from ftransformer.cli import finetune_cmd, generate_cmd  # noqa: F401  (imported before the unchecked blocks)
from ftransformer.interop.hf import load_hf
from ftransformer.peft import load_peft, peft_format  # noqa: F401
from tests.typecheck import unchecked

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
import hf_tiny  # noqa: E402
from test_chat_data import CHATML_GENERATION  # noqa: E402
from test_hf_tokenizer import byte_level_backend, save_hf  # noqa: E402

COUNTRIES = ["France", "Spain", "Italy", "Peru", "Chile", "Japan", "Kenya", "Egypt", "Nepal", "Cuba", "Fiji", "Oman"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama (GQA) whose vocabulary fits a byte-level BPE tokenizer with a ChatML template."""
    directory = tmp_path_factory.mktemp("base")
    backend = byte_level_backend()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    save_hf(directory, backend, eos_token="<|im_end|>", chat_template=CHATML_GENERATION)
    hf_tiny.build("llama", directory, seed=1, vocab_size=backend.get_vocab_size(with_added_tokens=True),
                  max_position_embeddings=96)
    return directory


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Where is {c}?"},
                          {"role": "assistant", "content": f"{c} is on the map."}]} for c in COUNTRIES]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def finetune(base_dir, chat_file, out, *more):
    args = ["finetune", "--hf-dir", str(base_dir), "--data", str(chat_file), "--out", str(out), "--lora-rank", "4",
            "--lr", "1e-2", "--warmup", "2", "--batch", "2", "--seq-len", "48", "--eval-every", "5", "--quiet", *more]
    with unchecked():
        return main(args)


@pytest.fixture(scope="module")
def run_dir(base_dir, chat_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    assert finetune(base_dir, chat_file, out, "--steps", "20") == 0
    return out


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_finetune_lowers_the_loss_and_writes_its_files(run_dir):
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [0, 5, 10, 15, 20]
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    for name in ("latest", "best", "loss.png", "peft/adapter_config.json", "peft/adapter_model.safetensors"):
        assert (run_dir / name).exists(), name
    info = read_checkpoint_info(run_dir / "latest")
    assert info["config"]["kind"] == "lora-adapter" and info["config"]["rank"] == 4
    assert all(p.endswith((".a", ".b")) for p in tree.flatten_with_paths(load_tree_of(run_dir)))  # the adapter alone


def load_tree_of(out):
    from safetensors.torch import load_file

    return load_file(out / "latest" / "params.safetensors")


def test_ctrl_c_then_resume_is_exact(base_dir, chat_file, run_dir, tmp_path, capsys, monkeypatch):
    out, draw = tmp_path / "split", finetune_cmd.ChatRows.batch

    def interrupted(self, run, step):
        if step == 12:
            raise KeyboardInterrupt
        return draw(self, run, step)

    monkeypatch.setattr(finetune_cmd.ChatRows, "batch", interrupted)
    assert finetune(base_dir, chat_file, out, "--steps", "20") == 130  # Ctrl-C: the current step saved
    assert 10 <= read_checkpoint_info(out / "latest")["step"] <= 12
    monkeypatch.setattr(finetune_cmd.ChatRows, "batch", draw)
    assert finetune(base_dir, chat_file, out, "--resume") == 0
    whole, resumed = load_tree_of(run_dir), load_tree_of(out)
    assert sorted(whole) == sorted(resumed)
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert [r["val_loss"] for r in metrics(out)] == [r["val_loss"] for r in metrics(run_dir)]
    capsys.readouterr()
    assert finetune(base_dir, chat_file, out, "--steps", "20") == 2
    assert "add --resume" in capsys.readouterr().err
    assert finetune(base_dir, chat_file, out, "--resume", "--lora-rank", "8") == 2
    assert "--lora-rank 8 differs" in capsys.readouterr().err


def test_the_peft_copy_is_the_trained_adapter(base_dir, run_dir):
    from ftransformer.model import forward

    cfg, params = load_hf(base_dir)
    x = hf_tiny.tokens(1, 8)
    with unchecked():
        ours = forward(finetune_cmd.load_adapter(str(run_dir), params, cfg), x, cfg)
        theirs = forward(load_peft(run_dir / "peft", params, cfg), x, cfg)
    # best/ (read by load_adapter) is the last step here: the val loss fell at every evaluation
    assert read_checkpoint_info(run_dir / "best")["step"] == 20
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_generate_with_the_adapter(base_dir, run_dir, capsys):
    with unchecked():
        rc = main(["generate", "--hf-dir", str(base_dir), "--adapter", str(run_dir), "--chat", "--prompt",
                   "Where is Peru?", "--max-new-tokens", "6", "--temperature", "0"])
    assert rc == 0 and capsys.readouterr().out.strip()
    with unchecked():
        rc = main(["generate", "--hf-dir", str(base_dir), "--adapter", str(run_dir / "nowhere"), "--prompt", "x"])
    assert rc == 2 and "no adapter" in capsys.readouterr().err


def test_qlora_trains_the_adapter_alone_on_an_nf4_base(base_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "qlora"
    assert finetune(base_dir, chat_file, out, "--qlora", "--steps", "10") == 0
    records = metrics(out)
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]
    info = read_checkpoint_info(out / "latest")
    assert info["config"]["base"] == "nf4" and info["extra"]["finetune"]["qlora"] is True
    assert all(p.endswith((".a", ".b")) for p in load_tree_of(out))  # the adapter alone, no NF4 base
    capsys.readouterr()
    with unchecked():
        rc = main(["generate", "--hf-dir", str(base_dir), "--adapter", str(out), "--prompt", "Where",
                   "--max-new-tokens", "3", "--temperature", "0"])
    assert rc == 0 and "dequantizes its NF4 base" in capsys.readouterr().out


def test_a_stack_of_adapters_trains_each_member(base_dir, chat_file, tmp_path, capsys):
    from ftransformer.model import forward

    out = tmp_path / "stack"
    assert finetune(base_dir, chat_file, out, "--adapters", "seed=0,1;rank=2,4", "--steps", "10") == 0
    records = metrics(out)
    assert sorted({r["member"] for r in records}) == [0, 1, 2, 3]
    for i in range(4):
        mine = [r for r in records if r["member"] == i]
        assert mine[-1]["train_loss"] < 0.8 * mine[0]["train_loss"], i
        assert (out / f"member-{i}" / "latest").exists() and (out / f"member-{i}" / "peft").exists()
    assert read_checkpoint_info(out / "member-3" / "latest")["config"]["adapter"]["rank"] == 4
    cfg, params = load_hf(base_dir)
    x = hf_tiny.tokens(1, 8)
    with unchecked():
        one = forward(finetune_cmd.load_adapter(str(out), params, cfg, member=1), x, cfg)
        peft_copy = forward(load_peft(out / "member-1" / "peft", params, cfg), x, cfg)
        other = forward(finetune_cmd.load_adapter(str(out), params, cfg, member=0), x, cfg)
    torch.testing.assert_close(one, peft_copy, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(one, other)
    capsys.readouterr()
    with unchecked():
        rc = main(["generate", "--hf-dir", str(base_dir), "--adapter", str(out), "--member", "1", "--chat",
                   "--prompt", "Where is Peru?", "--max-new-tokens", "4", "--temperature", "0"])
        assert rc == 0 and capsys.readouterr().out.strip()
        assert main(["generate", "--hf-dir", str(base_dir), "--adapter", str(out), "--prompt", "x"]) == 2
        assert "--member" in capsys.readouterr().err
        assert main(["generate", "--hf-dir", str(base_dir), "--adapter", str(out), "--member", "4", "--prompt", "x"]) == 2
        assert "--member must be in [0, 4)" in capsys.readouterr().err


def test_a_stack_resumes_exactly(base_dir, chat_file, tmp_path, monkeypatch):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert finetune(base_dir, chat_file, whole, "--adapters", "2", "--steps", "6") == 0
    draw = finetune_cmd.ChatMembers.host_batch

    def interrupted(self, run, step, seed):
        if step == 4:
            raise KeyboardInterrupt
        return draw(self, run, step, seed)

    monkeypatch.setattr(finetune_cmd.ChatMembers, "host_batch", interrupted)
    assert finetune(base_dir, chat_file, split, "--adapters", "2", "--steps", "6") == 130
    monkeypatch.setattr(finetune_cmd.ChatMembers, "host_batch", draw)
    assert finetune(base_dir, chat_file, split, "--resume") == 0
    for i in range(2):
        a, b = (load_tree_of(d / f"member-{i}") for d in (whole, split))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), i


def test_dp_noise_trains_and_reports_epsilon(base_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "dp"
    capsys.readouterr()
    assert finetune(base_dir, chat_file, out, "--dp-noise", "0.02", "--dp-clip", "1.0", "--batch", "8", "--steps", "10") == 0
    text = capsys.readouterr().out
    records = metrics(out)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert read_checkpoint_info(out / "latest")["extra"]["finetune"]["dp_noise"] == 0.02
    line = next(x for x in text.splitlines() if x.startswith("privacy:"))
    try:
        import opacus  # noqa: F401
    except ImportError:
        assert "epsilon not computed" in line and "opacus" in line
    else:
        eps = float(line.split("epsilon ")[1].split()[0])
        assert eps > 0 and "delta 1e-05 after 10 steps" in line


def test_a_private_run_resumes_exactly(base_dir, chat_file, tmp_path, monkeypatch):
    whole, split, draw = tmp_path / "whole", tmp_path / "split", finetune_cmd.ChatRows.batch
    flags = ("--dp-noise", "0.5", "--steps", "4", "--eval-every", "2")
    assert finetune(base_dir, chat_file, whole, *flags) == 0

    def interrupted(self, run, step):
        if step == 3:
            raise KeyboardInterrupt
        return draw(self, run, step)

    monkeypatch.setattr(finetune_cmd.ChatRows, "batch", interrupted)
    assert finetune(base_dir, chat_file, split, *flags) == 130
    monkeypatch.setattr(finetune_cmd.ChatRows, "batch", draw)
    assert finetune(base_dir, chat_file, split, "--resume") == 0
    a, b = load_tree_of(whole), load_tree_of(split)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags, message", [
    (["--dp-clip", "1.0"], "--dp-clip needs --dp-noise"),
    (["--dp-noise", "0"], "--dp-noise must be > 0"),
    (["--adapters", "2", "--qlora"], "leave out --qlora"),
    (["--adapters", "rank=0"], "ranks >= 1"),
    (["--adapters", "depth=2"], "--adapters depth: can sweep only seed, rank, lr, weight_decay"),
])
def test_bad_mode_flags_are_named(base_dir, chat_file, tmp_path, capsys, flags, message):
    assert finetune(base_dir, chat_file, tmp_path / "bad", *flags) == 2
    assert message in capsys.readouterr().err


def test_dora_run_writes_a_dora_adapter(base_dir, chat_file, tmp_path):
    out = tmp_path / "dora"
    assert finetune(base_dir, chat_file, out, "--dora", "--steps", "2", "--eval-every", "2", "--targets",
                    "blocks.*.attn.w_qkv") == 0
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    assert config["r"] == 4 and config["lora_alpha"] == 8
